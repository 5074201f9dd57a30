"""Peer: onnxruntime-genai's model builder (PyPI ``onnxruntime-genai``) on the same weights, as a
kvexport program directory (target ``ort-genai``; :mod:`.peer_program`).

``export_ortgenai`` writes the loaded model as a plain Hugging Face directory (``config.json``,
``model.safetensors`` with ``model.``-prefixed names, the tokenizer files) into a temporary folder, runs
``python -m onnxruntime_genai.models.builder -e cpu -p fp32|int4`` on it (int4: its ``MatMulNBits``
weights, block 32, int8 activations — the builder's CPU defaults), sets the search ``max_length`` of
``genai_config.json`` to the program's context, and writes ``model.onnx`` (+ ``model.onnx.data``),
``genai_config.json``, the tokenizer files and the manifest atomically. The manifest's KV bytes per
token come from the dtype of the graph's ``past_key_values`` inputs (what the builder chose).

:class:`OrtGenaiRunner` drives ``onnxruntime_genai.Generator``: ``append_tokens`` runs the model on
a chunk (prefill or one decode step), ``get_logits`` reads the last token's logits; intra-op threads =
``kvexport.threads.count()`` (``kvexport bench --threads`` sets it), applied through a config overlay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvexport import threads
from kvexport.baselines.peer_program import (
    peer_constants,
    peer_identity,
    peer_manifest,
    replaceable_peer,
    synthetic_stats,
)
from kvexport.errors import KvxError
from kvexport.export.build import copy_tokenizer
from kvexport.export.runtime import StepRunner
from kvexport.fsutil import atomic_directory
from kvexport.models.loader import LoadedModel

TARGET = "ort-genai"
PRECISIONS = ("fp32", "int4")
CONFIG = "genai_config.json"
INSTALL = "pip install onnxruntime-genai"


def available() -> str | None:
    """None when onnxruntime-genai imports, else why not (one line)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception as err:
        return f"onnxruntime-genai is not installed ({type(err).__name__}); {INSTALL}"
    return None


def write_hf_directory(loaded: LoadedModel, out: Path) -> Path:
    """``loaded`` as a Hugging Face Llama directory (what the builder reads)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    a = loaded.args
    LlamaConfig(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, intermediate_size=a.intermediate_size,
                vocab_size=a.vocab_size, rope_theta=a.rope_theta, rms_norm_eps=a.norm_eps,
                max_position_embeddings=a.max_position, tie_word_embeddings=a.tie_embeddings,
                bos_token_id=loaded.tokenizer.bos_id, eos_token_id=list(loaded.tokenizer.eos_ids),
                architectures=["LlamaForCausalLM"]).to_json_file(str(out / "config.json"))
    state = {}
    for key, value in loaded.build(fused=False).state_dict().items():  # our reading of the weights (ties applied)
        if key == "lm_head.weight" and a.tie_embeddings:
            continue
        name = key if key.startswith("lm_head.") else f"model.{key}"
        state[name] = value.detach().to(torch.float32).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(loaded.tokenizer, out)
    return out


def _kv_format(loaded: LoadedModel, config: dict, graph: Path) -> tuple[int, str]:
    """Bytes of K and V of one token over all layers, and their dtype: the graph's ``past_key_values.0.key``."""
    import onnx

    dtype = next(i.type.tensor_type.elem_type for i in onnx.load(str(graph), load_external_data=False).graph.input
                 if i.name == config["model"]["decoder"]["inputs"]["past_key_names"] % 0)
    name, size = {onnx.TensorProto.FLOAT: ("fp32", 4), onnx.TensorProto.FLOAT16: ("fp16", 2),
                  onnx.TensorProto.BFLOAT16: ("bf16", 2)}[dtype]
    a = loaded.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * size, name


def export_ortgenai(loaded: LoadedModel, max_context: int, out_dir: Path, precision: str = "fp32",
                    log=print) -> Path:
    """Build ``loaded`` with onnxruntime-genai's builder into ``out_dir`` (atomic); returns ``out_dir``."""
    if precision not in PRECISIONS:
        raise KvxError(f"unknown onnxruntime-genai precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if (why := available()) is not None:
        raise KvxError(why)
    out_dir = Path(out_dir).resolve()
    identity = peer_identity(loaded, TARGET, "model_builder", precision, max_context)
    t0 = time.perf_counter()
    with atomic_directory(out_dir, replaceable_peer(identity)) as tmp, \
            tempfile.TemporaryDirectory(prefix="kvexport-ortgenai-") as work:
        (Path(work) / "hf").mkdir()
        hf = write_hf_directory(loaded, Path(work) / "hf")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", str(Path(work) / "cache")]
        log(f"onnxruntime-genai builder: {loaded.name}, {precision} (seconds for 135M)")
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / "model.onnx").is_file():
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
            raise KvxError(f"onnxruntime-genai's builder failed (exit {done.returncode}): "
                           f"{(lines[-1] if lines else 'no output')[:200]}")
        config = json.loads((tmp / CONFIG).read_text())
        config["search"]["max_length"] = max_context
        (tmp / CONFIG).write_text(json.dumps(config, indent=4))
        for stray in set(p.name for p in tmp.iterdir()) - {"model.onnx", "model.onnx.data", CONFIG}:
            (tmp / stray).unlink()  # the builder's tokenizer copies: ours replace them
        copy_tokenizer(loaded.tokenizer, tmp)
        kv_bytes, kv_dtype = _kv_format(loaded, config, tmp / "model.onnx")
        files = ["model.onnx", *(["model.onnx.data"] if (tmp / "model.onnx.data").is_file() else []), CONFIG]
        manifest = peer_manifest(
            loaded, identity, tmp, files, max_context - 1, kv_bytes, f"{kv_dtype}-kv (onnxruntime-genai)",
            peer_constants(loaded, max_context, max_context - 1), t0, export_command=cmd[:4] + cmd[6:11])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return out_dir


class OrtGenaiRunner(StepRunner):
    """An onnxruntime-genai model directory, one ``Generator`` per :meth:`reset`."""

    targets = (TARGET,)

    def _load(self) -> None:
        if (why := available()) is not None:
            raise KvxError(why)
        import onnxruntime_genai as og

        if getattr(self, "model", None) is None:
            config = og.Config(str(self.dir))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads.count(), "inter_op_num_threads": 1}}}}))
            try:
                self.model = og.Model(config)
            except Exception as err:
                raise KvxError(f"onnxruntime-genai cannot load {self.dir} ({str(err).splitlines()[0][:160]}); "
                               "rebuild it with 'kvexport bench --peers'") from None
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_context)
        self.generator = og.Generator(self.model, params)

    def _metadata(self) -> dict:
        config = json.loads((self.dir / CONFIG).read_text())
        return {"get_max_context_len": config["search"]["max_length"], "get_max_seq_len": self.max_chunk + 1,
                "get_vocab_size": config["model"]["vocab_size"]}

    def _execute(self, tokens, input_pos):
        self.generator.append_tokens(tokens.astype(np.int32))
        logits = np.array(self.generator.get_logits(), dtype=np.float32).reshape(1, -1)
        return logits, synthetic_stats(self.manifest, int(input_pos[0]) + tokens.shape[1])
