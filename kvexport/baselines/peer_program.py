"""Peer program directories: another toolchain's export of the same weights (ExecuTorch's
``export_llama``, onnxruntime-genai, llama.cpp) laid out as a kvexport program directory, so that
``open_runner``, ``kvexport run`` and ``kvexport bench`` treat it like one of ours.

A peer directory holds the peer's own files, our tokenizer files and a ``manifest.json`` written by
:func:`peer_manifest`: the fields every program has (target, ``program_files`` with SHA-256, model
identity, tokenizer, constant ``metadata``, ``cache.max_context`` / ``max_chunk``) plus ``cache``'s
``kv_bytes_per_token`` in the peer's own cache format and ``policy.spec`` naming that format. Peers have no
``kv_stats`` output: their runners report :func:`synthetic_stats` (allocated = the whole cache,
used = the tokens cached so far, both from ``kv_bytes_per_token``, and bits per cached K/V element
from the same number, scales and zero points included).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from kvexport.export.build import replaceable_program, tokenizer_entry, versions
from kvexport.export.manifest import LAYOUT_VERSION
from kvexport.fsutil import sha256_file
from kvexport.kv import stats as kv_stats
from kvexport.models.loader import LoadedModel


def peer_identity(loaded: LoadedModel, target: str, ops_mode: str, weights: str, max_context: int) -> dict:
    """What decides a peer program (the keys of :func:`kvexport.export.build.build_identity`)."""
    return {"model": [loaded.name, loaded.identity], "cache_options": None, "max_context": max_context,
            "target": target, "ops_mode": ops_mode, "weights": weights}


def replaceable_peer(identity: dict):
    """``replaceable`` for :func:`~kvexport.fsutil.atomic_directory`: only a rebuild of the same peer."""
    return replaceable_program(json.loads(json.dumps(identity, default=str)), force=False)


def peer_manifest(loaded: LoadedModel, identity: dict, directory: Path, files: list[str], max_chunk: int,
                  kv_bytes_per_token: int, kv_format: str, constants: dict, started: float, **extra) -> dict:
    """The manifest of a peer built into ``directory`` (``files[0]`` is the program file; every file
    listed is hashed). ``constants``: the program's own constant values (``get_max_context_len`` ...)."""
    a = loaded.args
    max_context = identity["max_context"]
    return {
        "format": "kvexport-program",
        "layout_version": LAYOUT_VERSION,
        "target": identity["target"],
        "program": files[0],
        "program_files": {f: sha256_file(directory / f) for f in files},
        "ops_mode": identity["ops_mode"],
        "weights": identity["weights"],
        "model": {"name": loaded.name, "source": loaded.source, "identity": loaded.identity,
                  "args": {k: getattr(a, k) for k in a.__dataclass_fields__}},
        "tokenizer": tokenizer_entry(loaded.tokenizer),
        "metadata": constants,
        "cache": {"max_context": max_context, "max_chunk": max_chunk, "kv_format": kv_format,
                  "kv_bytes_per_token": kv_bytes_per_token, "kv_bytes_allocated": kv_bytes_per_token * max_context},
        "policy": {"spec": kv_format},
        "versions": versions(),
        "build_seconds": round(time.perf_counter() - started, 1),
        **extra,
    }


def peer_constants(loaded: LoadedModel, max_context: int, max_chunk: int) -> dict:
    """Constant metadata of a peer whose program file carries none of ours (ONNX Runtime GenAI, llama.cpp)."""
    tok = loaded.tokenizer
    return {"get_max_context_len": max_context, "get_max_seq_len": max_chunk + 1,
            "get_vocab_size": loaded.args.vocab_size, "get_bos_id": tok.bos_id, "get_eos_ids": list(tok.eos_ids)}


def synthetic_stats(manifest: dict, cached: int) -> np.ndarray:
    """``kv_stats`` float32 ``[len(FIELDS)]`` (numpy, as runners return it) of a peer holding ``cached`` tokens."""
    per_token = manifest["cache"]["kv_bytes_per_token"]
    a = manifest["model"]["args"]
    elements = 2 * a["n_layers"] * a["n_kv_heads"] * (a["dim"] // a["n_heads"])  # K and V values of one token
    stats = np.zeros(len(kv_stats.FIELDS), dtype=np.float32)
    stats[kv_stats.INDEX["kv_bytes_allocated"]] = per_token * manifest["cache"]["max_context"]
    stats[kv_stats.INDEX["kv_bytes_used"]] = per_token * cached
    stats[kv_stats.INDEX["avg_bits"]] = 8 * per_token / elements
    stats[kv_stats.INDEX["tokens_cached"]] = cached
    return stats
