"""kvexport custom ops: ``kvexport::quantize_pack``, ``kvexport::pool_attention``, ``kvexport::layer_attention``
(one layer's attention over the whole cache plus the chunk's cache write), ``kvexport::allocate`` (the
overflow rule, :mod:`kvexport.kv.allocate`, in one call) and ``kvexport::q8_linear`` (a linear on Q8_0 codes
read in place: the ``q4-q8`` lm_head, :mod:`kvexport.models.tied`).

* :func:`load` registers the ops with ``torch.library`` (functional + ``.out`` overloads, eager CPU
  kernels that call the reference in :mod:`kvexport.kv`, fake kernels for ``torch.export``).
* :func:`load_executorch_kernels` loads the compiled ExecuTorch kernels (building them on first
  use) into the ExecuTorch Python runtime, exactly once per process, from one path.
* ONNX Runtime runs ``kvexport::layer_attention`` from ``libkvexport_ort.so``
  (:func:`kvexport.native_build.build_ort_library`): the same C++ core (``csrc/layer_attention.cpp``) behind a
  second thin wrapper (``csrc/ort_ops.cpp``); an ONNX graph holds the op's ONNX form
  (``layer_attention(..., onnx=True)``).
* :func:`quantize_pack` / :func:`pool_attention` are what model code
  calls: the custom op, or with ``portable=True`` the core-ATen reference inlined (a program that
  runs on a stock ExecuTorch runtime with no kernel library). :func:`layer_attention` has no
  portable form (its reference reads the fill state as Python ints): portable programs keep the
  per-part attention of :class:`kvexport.kv.cache.MixedKVCache`.
* :func:`portable_decompositions` turns an already-exported program into the portable one.
* :func:`kernel_calls` counts the operator calls a ``.pte`` makes outside XNNPACK per step.
* :func:`missing_kernel_message` explains ``Missing operator: kvexport::...`` load failures.
* :mod:`kvexport.ops.onnx` holds the ONNX functions and the torch.onnx translation table.
"""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

import torch

from kvexport.kv import attention as _attention
from kvexport.kv import quant as _quant
from kvexport.native_build import BuildError, build_kernels, library_path
from kvexport.ops import library as _library

__all__ = [
    "BuildError",
    "KernelLibraryError",
    "allocate",
    "build_kernels",
    "kernel_calls",
    "layer_attention",
    "library_path",
    "load",
    "load_method",
    "load_executorch_kernels",
    "missing_kernel_message",
    "pool_attention",
    "portable_decompositions",
    "program_custom_ops",
    "quantize_pack",
    "raise_if_missing_kernel",
]

_lock = threading.Lock()
_kernel_lib_path: Path | None = None
_kernel_lib_handle: ctypes.CDLL | None = None


class KernelLibraryError(RuntimeError):
    """A program needs the kvexport ExecuTorch kernels and they are not loaded (one-line message)."""


def load() -> None:
    """Register the ``kvexport`` ops with torch.library. Idempotent."""
    with _lock:
        _library.register()


def load_executorch_kernels(path: str | Path | None = None) -> Path:
    """Load ``libkvexport_ops.so`` into the ExecuTorch Python runtime; build it first if missing.

    Idempotent. A process can hold only one copy of the kernel library (a second copy from another
    path aborts the process inside ExecuTorch), so asking for a different path after the first
    load raises instead.
    """
    global _kernel_lib_path, _kernel_lib_handle
    with _lock:
        wanted = Path(path).resolve() if path is not None else None
        if _kernel_lib_path is not None:
            if wanted is not None and wanted != _kernel_lib_path:
                raise KernelLibraryError(
                    f"kvexport kernels already loaded from {_kernel_lib_path}; "
                    f"refusing to load a second copy from {wanted}"
                )
            return _kernel_lib_path
        if wanted is None:
            wanted = build_kernels()
        elif not wanted.is_file():
            raise KernelLibraryError(f"kvexport kernel library not found: {wanted}")
        # the registry our kernels register into lives in _portable_lib: it must be loaded first
        # (our library's DT_NEEDED then resolves to this same copy by soname)
        import executorch.extension.pybindings.portable_lib  # noqa: F401

        _kernel_lib_handle = ctypes.CDLL(str(wanted), mode=ctypes.RTLD_GLOBAL)
        _kernel_lib_path = wanted
        return wanted


def kernels_loaded() -> bool:
    return _kernel_lib_path is not None


# ----------------------------------------------------------------------------- missing kernels

# ExecuTorch's load_method raises RuntimeError("Failed to load method forward, error: 0x:14")
# (Error::OperatorMissing) and logs "Missing operator: [i] kvexport::op.out" to stderr.
_OPERATOR_MISSING_RE = re.compile(r"error:?\s*0x:?14\b|OperatorMissing|Missing operator", re.IGNORECASE)
_ERROR_CODE_RE = re.compile(r"error:?\s*0x:?([0-9a-fA-F]+)")
_LOGGED_OP_RE = re.compile(r"Missing operator:?\s*(?:\[\d+\]\s*)?(kvexport::[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


def _execution_plans(program: str | Path | bytes):
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = program if isinstance(program, (bytes, bytearray)) else Path(program).read_bytes()
    pte = deserialize_pte_binary(bytes(data))
    return getattr(pte, "program", pte).execution_plan


def kernel_calls(program: str | Path | bytes, method: str = "forward") -> int:
    """Operator calls outside delegates (XNNPACK) that one run of ``method`` of a ``.pte`` makes:
    the program's instructions are straight-line, so this is the count per decode step."""
    from executorch.exir.schema import KernelCall

    plan = next(p for p in _execution_plans(program) if p.name == method)
    return sum(isinstance(i.instr_args, KernelCall) for chain in plan.chains for i in chain.instructions)


def program_custom_ops(program: str | Path | bytes) -> list[str]:
    """``kvexport::`` operators (``name.overload``) a serialized ``.pte`` program calls."""
    names = []
    for plan in _execution_plans(program):
        for operator in plan.operators:
            name = f"{operator.name}.{operator.overload}" if operator.overload else operator.name
            if name.startswith("kvexport::") and name not in names:
                names.append(name)
    return names


def _registered_operator_names() -> set[str]:
    try:
        from executorch.runtime import Runtime

        return set(Runtime.get().operator_registry.operator_names)
    except Exception:  # pragma: no cover - runtime unavailable
        return set()


def missing_kernel_message(
    error: BaseException | str, program: str | Path | bytes | None = None, log: str = ""
) -> str | None:
    """One-line explanation when ExecuTorch failed to load a method because kvexport kernels are
    missing (``Missing operator: kvexport::...``, error 0x14); ``None`` when that is not the cause.

    ``program`` (the ``.pte`` path or bytes) and/or the captured runtime ``log`` say which
    operators the program needs; without either, any OperatorMissing error mentioning kvexport
    counts.
    """
    text = f"{error}\n{log}"
    code = _ERROR_CODE_RE.search(str(error))
    if code is not None and int(code.group(1), 16) != 0x14:
        return None  # the load failed for another reason
    if not _OPERATOR_MISSING_RE.search(text):
        return None
    names = list(dict.fromkeys(_LOGGED_OP_RE.findall(text)))
    if program is not None:
        registered = _registered_operator_names()
        names += [n for n in program_custom_ops(program) if n not in registered and n not in names]
    if not names:
        if "kvexport::" not in text:
            return None
        names = ["kvexport ops"]
    return (
        f"the program calls the custom operator(s) {', '.join(names)} but the kvexport ExecuTorch kernel library "
        "(libkvexport_ops.so) is not loaded: call kvexport.ops.load_executorch_kernels() before loading it "
        "(build: python -m kvexport.native_build), or re-export with --ops portable"
    )


def raise_if_missing_kernel(error: BaseException, program: str | Path | bytes | None = None, log: str = "") -> None:
    """Raise :class:`KernelLibraryError` (one-line message) when ``error`` is a missing-kvexport-kernel
    failure; otherwise do nothing (the caller re-raises)."""
    message = missing_kernel_message(error, program, log)
    if message is not None:
        raise KernelLibraryError(message) from None


def load_method(program: str | Path | bytes, method: str = "forward"):
    """Load ``method`` of a ``.pte`` with the ExecuTorch Python runtime; a program that needs
    kvexport kernels that are not loaded raises :class:`KernelLibraryError` with one line."""
    from executorch.runtime import Runtime

    # A path is loaded as a file: a program loaded from bytes reads them for as long as its methods
    # run, so callers passing bytes must keep them alive themselves.
    source = bytes(program) if isinstance(program, (bytes, bytearray)) else str(program)
    loaded = Runtime.get().load_program(source)
    try:
        return loaded.load_method(method)
    except RuntimeError as e:
        raise_if_missing_kernel(e, program)
        raise


# ----------------------------------------------------------------------------- model-facing calls


def quantize_pack(x: torch.Tensor, bits: int, group: int, clip: float = 1.0, *, portable: bool = False):
    if portable:
        return _quant.quantize_packed(x, bits, group, clip)
    load()
    return torch.ops.kvexport.quantize_pack(x, bits, group, clip)


def pool_attention(
    q,
    k_packed,
    k_scale,
    k_zero,
    v_packed,
    v_scale,
    v_zero,
    n_valid,
    bits: int,
    group: int,
    scale: float,
    *,
    portable: bool = False,
):
    if portable:
        return _attention.pool_attention(
            q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale
        )
    load()
    return torch.ops.kvexport.pool_attention(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, float(scale)
    )


def layer_attention(q, k, v, cos, sin, state, parts, pools, layer: int, group: int, scale: float, features: bool,
                    rotate: int, *, onnx: bool = False):
    """``kvexport::layer_attention`` (spec: :mod:`kvexport.kv.layer_attention`): q ``[1, T, Hq·D]``, k, v
    ``[1, T, H·D]`` before RoPE, ``cos, sin [T, D]``; ``parts``: the cache parts it writes (sink_k, sink_v, win_k,
    win_v, evict_k, evict_v), in place. Returns ``(out [1, T, Hq·D], recv [W + T, 3])``;
    ``onnx=True`` (``kvexport::layer_attention_onnx``, the form an ONNX graph holds: declared
    functional, run in place by our ONNX Runtime kernel) also returns this layer's staged rows
    ``evict_k[:T, layer]``, ``evict_v[:T, layer]``, which eviction reads."""
    load()
    fn = torch.ops.kvexport.layer_attention_onnx if onnx else torch.ops.kvexport.layer_attention
    return fn(q, k, v, cos, sin, state, *parts, list(pools), layer, group, float(scale), bool(features), int(rotate))


def allocate(desired, valid, fill, caps):
    """``kvexport::allocate`` (spec: :func:`kvexport.kv.allocate.allocate`): (class, slot, new fill)."""
    load()
    return torch.ops.kvexport.allocate(desired, valid, fill, caps)


def portable_decompositions() -> dict:
    """Decomposition table inlining the core-ATen reference for each kvexport op; use as
    ``ep.run_decompositions(portable_decompositions())`` before ``to_edge_transform_and_lower``."""
    load()
    return _library.portable_decompositions()
