"""The peers ``kvexport bench --peers`` puts next to our programs: other toolchains' exports of the same
weights, each built once and cached as a program directory ``<out>/<model>-peer-<name>-ctx<N>``.

=====================  ==============================================================================
``etllama-fp32``       ExecuTorch ``export_llama``, fp32 weights, fp32 KV cache (its custom SDPA op)
``etllama-fp32-int8kv`` the same with its int8 KV cache (``--quantize_kv_cache``)
``etllama-8da4w``      ``-qmode 8da4w`` (group 32), fp32 KV cache
``etllama-8da4w-int8kv`` 8da4w with the int8 KV cache
``ortgenai-fp32``      onnxruntime-genai's model builder, fp32 weights
``ortgenai-int4``      the same with int4 ``MatMulNBits`` weights (block 32)
``llamacpp``           llama.cpp on the GGUF itself (Q4_1 linears, Q8_0 table), f16 KV cache
``llamacpp-q8kv``      llama.cpp with a q8_0 KV cache (flash attention on)
=====================  ==============================================================================

A peer that cannot be built here (its package is not installed, or the model has no GGUF) is not
dropped: :func:`ensure_peers` returns it with the one-line reason, and ``bench`` prints that row.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from kvexport.errors import KvxError
from kvexport.export.build import build_identity, existing_program
from kvexport.models.loader import LoadedModel


def _builders(gguf: Path | None) -> dict:
    """name -> (build(loaded, max_context, out_dir, log=...), a check that says why it cannot run, or None)."""
    from kvexport.baselines import executorch_llama, llamacpp, ortgenai

    et, og = executorch_llama.export_baseline, ortgenai.export_ortgenai
    return {
        "etllama-fp32": (partial(et, qmode=None, kv="fp32"), None),
        "etllama-fp32-int8kv": (partial(et, qmode=None, kv="int8"), None),
        "etllama-8da4w": (partial(et, qmode="8da4w", kv="fp32"), None),
        "etllama-8da4w-int8kv": (partial(et, qmode="8da4w", kv="int8"), None),
        "ortgenai-fp32": (partial(og, precision="fp32"), ortgenai.available),
        "ortgenai-int4": (partial(og, precision="int4"), ortgenai.available),
        "llamacpp": (partial(llamacpp.export_llamacpp, gguf=gguf, kv="f16"), llamacpp.available),
        "llamacpp-q8kv": (partial(llamacpp.export_llamacpp, gguf=gguf, kv="q8_0"), llamacpp.available),
    }


PEERS = ("etllama-fp32", "etllama-fp32-int8kv", "etllama-8da4w", "etllama-8da4w-int8kv",
         "ortgenai-fp32", "ortgenai-int4", "llamacpp", "llamacpp-q8kv")


def parse_peers(spec: str) -> list[str]:
    """``all`` or a comma-separated subset of :data:`PEERS` (``--peers``)."""
    names = list(PEERS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise KvxError(f"unknown peer '{(unknown or [spec])[0]}'; choose 'all' or some of {', '.join(PEERS)}")
    return names


def peer_dir(out: Path, loaded: LoadedModel, name: str, max_context: int) -> Path:
    return Path(out) / f"{loaded.name}-peer-{name}-ctx{max_context}"


def ensure_peers(loaded: LoadedModel, names: list[str], max_context: int, out: Path, gguf: Path | None = None,
                 log=print) -> list[tuple[str, Path | None, str | None]]:
    """``(name, program directory, None)`` for every peer built (or found already built with the same
    weights and context), ``(name, None, reason)`` for every peer that cannot be built here."""
    builders = _builders(gguf)
    done = []
    for name in names:
        build, why_not = builders[name]
        path = peer_dir(out, loaded, name, max_context)
        reason = why_not() if why_not else None
        manifest = existing_program(path) if reason is None else None
        model = manifest.get("model", {}) if manifest else {}
        if manifest and [model.get("name"), model.get("identity")] == [loaded.name, loaded.identity] \
                and build_identity(manifest)["max_context"] == max_context:
            done.append((name, path, None))  # built by an earlier run
            continue
        if reason is None:
            try:
                build(loaded, max_context=max_context, out_dir=path, log=log)
            except KvxError as err:
                reason = str(err)
        done.append((name, None, reason) if reason else (name, path, None))
    return done
