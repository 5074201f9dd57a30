"""Peer: ExecuTorch's own Llama export (``executorch.examples.models.llama.export_llama``) of the same
weights, as a kvexport program directory (target ``executorch-llama``; :mod:`.peer_program`).

``export_baseline`` writes our Hugging Face Llama weights as the Meta-layout checkpoint +
``params.json`` that export_llama reads, runs export_llama in a subprocess (XNNPACK with extended
ops, its custom SDPA op with a KV cache updated in place, dynamic chunk length), with fp32 weights or
``-qmode 8da4w`` and an fp32 KV cache or its int8 one (``kv="int8"``: ``--quantize_kv_cache``, int8
values with an fp32 scale and an int8 zero point per token and head, and its quantized SDPA op), and
writes ``model.pte``, ``manifest.json`` and the tokenizer files into the output directory atomically.
:class:`ExecuTorchLlamaRunner` runs such a directory through the same
:class:`~kvexport.export.runtime.StepRunner` interface as our programs.

RoPE: our weights keep Hugging Face's q/k layout ("rotate_half" pairs ``i`` and ``i + D/2``);
``params.json`` sets ``use_hf_rope`` so export_llama applies the same rotation, and q/k need no
permutation.

The program's forward is ``(tokens int64 [1, T], input_pos int64 [1]) -> logits float32 [1, V]``
(last token only; ``T <= max_seq_len - 1``: export_llama bounds the dynamic dim that way).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvexport import quiet
from kvexport.baselines.peer_program import peer_identity, peer_manifest, replaceable_peer, synthetic_stats
from kvexport.errors import KvxError
from kvexport.export.build import copy_tokenizer
from kvexport.export.et_runtime import execute, program_constants, size_pool
from kvexport.export.runtime import StepRunner
from kvexport.fsutil import atomic_directory
from kvexport.models.loader import LoadedModel
from kvexport.models.weights import INT4_GROUP

TARGET = "executorch-llama"
QMODES = ("8da4w",)
KV_DTYPES = ("fp32", "int8")
PROGRAM = "model.pte"
EXPORT_MODULE = "executorch.examples.models.llama.export_llama"

# Hugging Face LlamaForCausalLM name (without "model.") -> Meta / llama_transformer name.
_HF_TO_META = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def meta_state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """``loaded.state_dict`` (HF names, with or without ``model.``) in llama_transformer's names,
    fp32, q/k unpermuted (``use_hf_rope``); tied embeddings become an explicit ``output.weight``."""
    out = {}
    for key, value in loaded.state_dict.items():
        key = key.removeprefix("model.")
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            if rest not in _HF_TO_META:
                raise KvxError(f"weight {key} has no place in ExecuTorch's Llama; this model is not a plain Llama")
            out[f"layers.{idx}.{_HF_TO_META[rest]}"] = value
        elif key in _HF_TO_META:
            out[_HF_TO_META[key]] = value
        else:
            raise KvxError(f"weight {key} has no place in ExecuTorch's Llama; this model is not a plain Llama")
    if loaded.args.tie_embeddings or "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def params_json(loaded: LoadedModel) -> dict:
    """export_llama's ``--params``: fields of its ``ModelArgs``."""
    a = loaded.args
    return {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim, "hidden_dim": a.intermediate_size, "vocab_size": a.vocab_size,
            "norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "use_hf_rope": True, "use_scaled_rope": False}


def kv_bytes_per_token(loaded: LoadedModel, kv: str = "fp32") -> int:
    """K and V of one token over all layers in export_llama's cache ([1, H_kv, max_context, D] per
    layer): fp32 values, or int8 values plus an fp32 scale and an int8 zero point per head."""
    a = loaded.args
    per_head = a.head_dim * 4 if kv == "fp32" else a.head_dim + 4 + 1
    return 2 * a.n_layers * a.n_kv_heads * per_head


def export_command(checkpoint: Path, params: Path, work_dir: Path, max_context: int, max_seq_len: int,
                   qmode: str | None, kv: str, metadata: dict) -> list[str]:
    cmd = [sys.executable, "-m", EXPORT_MODULE,
           "--model", "smollm2",  # recipe name only: with --checkpoint nothing is downloaded
           "--checkpoint", str(checkpoint), "--params", str(params),
           "-kv", "--use_sdpa_with_kv_cache", "-X", "--xnnpack-extended-ops", "-d", "fp32",
           "--max_seq_length", str(max_seq_len), "--max_context_length", str(max_context),
           "--metadata", json.dumps(metadata, separators=(",", ":")),
           "--output-dir", str(work_dir), "--output_name", str(work_dir / PROGRAM)]
    if qmode:
        cmd += ["-qmode", qmode, "-G", str(INT4_GROUP)]
    if kv == "int8":
        cmd += ["--quantize_kv_cache"]
    return cmd


def export_baseline(loaded: LoadedModel, max_context: int, out_dir: Path, qmode: str | None = None,
                    log=print, max_chunk: int | None = None, kv: str = "fp32") -> Path:
    """Export ``loaded`` with export_llama into ``out_dir`` (atomic); returns ``out_dir``.

    ``max_chunk``: most tokens one forward call takes (default ``max_context - 1``, i.e.
    export_llama's ``max_seq_length = max_context_length``); ``kv``: ``fp32`` or ``int8`` cache;
    :class:`KvxError` on bad options or a failed export (the export's log is named in the message)."""
    if qmode is not None and qmode not in QMODES:
        raise KvxError(f"unknown --qmode '{qmode}'; choose one of {', '.join(QMODES)} (or none for fp32)")
    if kv not in KV_DTYPES:
        raise KvxError(f"unknown export_llama KV cache '{kv}'; choose one of {', '.join(KV_DTYPES)}")
    max_chunk = max_chunk or max_context - 1
    if max_context < 2 or not 1 <= max_chunk < max_context:
        raise KvxError(f"need max_context >= 2 and 1 <= max_chunk < max_context (got {max_context}, {max_chunk})")
    tok = loaded.tokenizer
    out_dir = Path(out_dir).resolve()  # export_llama runs with cwd in the temporary directory
    ops_mode = "export_llama" if kv == "fp32" else "export_llama-int8kv"
    identity = peer_identity(loaded, TARGET, ops_mode, qmode or "fp32", max_context)
    t0 = time.perf_counter()
    with atomic_directory(out_dir, replaceable_peer(identity)) as tmp, \
            tempfile.TemporaryDirectory(prefix="kvexport-etllama-") as ckpt_dir:
        # export_llama treats a checkpoint whose *path* contains "int8" or "8da4w" as pre-quantized,
        # so the checkpoint lives outside out_dir (whose name may well say 8da4w).
        ckpt, params = Path(ckpt_dir) / "checkpoint.pth", tmp / "params.json"
        if any(s in str(ckpt) for s in ("int8", "8da4w")):
            raise KvxError(f"temporary directory {ckpt_dir} contains 'int8' or '8da4w', which export_llama "
                           "misreads; set TMPDIR to another directory")
        torch.save(meta_state_dict(loaded), ckpt)
        params.write_text(json.dumps(params_json(loaded), indent=1))
        cmd = export_command(ckpt, params, tmp, max_context, max_chunk + 1, qmode, kv,
                             {"get_bos_id": tok.bos_id, "get_eos_ids": list(tok.eos_ids)})
        log(f"export_llama: {loaded.name}, max_context {max_context}, chunk <= {max_chunk}, "
            f"weights {qmode or 'fp32'}, {kv} KV cache (a few minutes for 135M)")
        log_path = tmp / "export_llama.log"
        with open(log_path, "w") as log_file:
            rc = subprocess.run(cmd, cwd=tmp, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        ckpt.unlink()
        pte = tmp / PROGRAM
        if rc != 0 or not pte.is_file():
            kept = out_dir.parent / f"{out_dir.name}.export_llama.log"
            shutil.copy(log_path, kept)
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else "no output"
            raise KvxError(f"export_llama failed (exit {rc}): {last[:200]}; full log in {kept}")
        from executorch.runtime import Runtime

        constants = program_constants(Runtime.get().load_program(pte))
        if "get_eos_ids" not in constants:
            constants["get_eos_ids"] = list(tok.eos_ids)
        copy_tokenizer(tok, tmp)
        manifest = peer_manifest(
            loaded, identity, tmp, [PROGRAM], max_chunk, kv_bytes_per_token(loaded, kv),
            f"{kv}-kv (export_llama)", constants, t0,
            export_command=[c.replace(str(tmp), str(out_dir)) for c in cmd],  # checkpoint.pth: deleted
            params=params_json(loaded))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return out_dir


class ExecuTorchLlamaRunner(StepRunner):
    """An export_llama ``.pte`` through the ExecuTorch Python runtime (its custom SDPA / KV-cache
    kernels come from ``executorch.extension.llm.custom_ops``)."""

    targets = (TARGET,)

    def _load(self) -> None:
        from executorch.runtime import Runtime

        from kvexport.export.executorch import check_pte_header

        check_pte_header(self.path)
        size_pool()
        try:
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: kernels)
            import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed:: kernels of the int8 KV cache)
        except Exception:  # the runtime may already carry them; load_method says if not
            pass
        try:
            # From the path (not bytes): the runtime does not keep a bytes program alive.
            self.program = Runtime.get().load_program(self.path)
            with quiet.native_stderr():  # the threadpool set-up's cpuinfo lines
                self.method = self.program.load_method("forward")
        except RuntimeError as err:
            raise KvxError(f"ExecuTorch cannot load {self.path} ({str(err).splitlines()[0]}); "
                           "re-export it with 'kvexport baseline'") from None

    def _metadata(self) -> dict:
        return program_constants(self.program)

    def _execute(self, tokens, input_pos):
        logits = execute(self.method, [torch.from_numpy(tokens), torch.from_numpy(input_pos)])[0]
        if logits.dim() == 3:  # [1, T, V] if exported with --generate_full_logits
            logits = logits[:, -1]
        return logits.numpy(), synthetic_stats(self.manifest, int(input_pos[0]) + tokens.shape[1])
