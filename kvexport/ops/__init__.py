"""kvexport custom ops: ``kvexport::quantize_pack``, ``kvexport::dequantize_unpack``, ``kvexport::pool_attention``.

* :func:`load` registers the ops with ``torch.library`` (functional + ``.out`` overloads, eager CPU
  kernels that call the reference in :mod:`kvexport.kv`, fake kernels for ``torch.export``).
* :func:`load_executorch_kernels` loads the compiled ExecuTorch kernels (building them on first
  use) into the ExecuTorch Python runtime, exactly once per process, from one path.
* :func:`quantize_pack` / :func:`dequantize_unpack` / :func:`pool_attention` are what model code
  calls: the custom op, or with ``portable=True`` the core-ATen reference inlined (a program that
  runs on a stock ExecuTorch runtime with no kernel library).
* :func:`portable_decompositions` turns an already-exported program into the portable one.
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
from kvexport.ops import library as _library
from kvexport.ops.build import BuildError, build_kernels, library_path

__all__ = [
    "BuildError",
    "KernelLibraryError",
    "build_kernels",
    "dequantize_unpack",
    "library_path",
    "load",
    "load_executorch_kernels",
    "missing_kernel_message",
    "pool_attention",
    "portable_decompositions",
    "quantize_pack",
    "raise_if_missing_kernel",
]

OP_NAMES = ("quantize_pack", "dequantize_unpack", "pool_attention")

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
                    f"kvexport kernels already loaded from {_kernel_lib_path}; refusing to load a second copy from {wanted}"
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

_MISSING_RE = re.compile(r"Missing operator:?\s*(kvexport::[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


def missing_kernel_message(error: BaseException | str, log: str = "") -> str | None:
    """One-line explanation when ``error`` (or the captured runtime ``log``) says a kvexport
    kernel is missing (ExecuTorch ``Missing operator: kvexport::...``, error 0x14); else ``None``."""
    text = f"{error}\n{log}"
    match = _MISSING_RE.search(text)
    if match is None:
        if "kvexport::" not in text or not ("0x14" in text or "OperatorMissing" in text or "Missing operator" in text):
            return None
        op = "kvexport ops"
    else:
        op = match.group(1)
    return (
        f"this program uses the custom operator {op} but the kvexport ExecuTorch kernel library is not loaded: "
        "call kvexport.ops.load_executorch_kernels() (builds libkvexport_ops.so; `python -m kvexport.ops.build`) "
        "before loading it, or re-export with `--ops portable`"
    )


def raise_if_missing_kernel(error: BaseException, log: str = "") -> None:
    """Re-raise ``error`` as :class:`KernelLibraryError` with the one-line message when it is a
    missing-kvexport-kernel failure; otherwise do nothing."""
    message = missing_kernel_message(error, log)
    if message is not None:
        raise KernelLibraryError(message) from error


# ----------------------------------------------------------------------------- model-facing calls


def quantize_pack(x: torch.Tensor, bits: int, group: int, *, portable: bool = False):
    if portable:
        return _quant.quantize_packed(x, bits, group)
    load()
    return torch.ops.kvexport.quantize_pack(x, bits, group)


def dequantize_unpack(packed, scale, zero, bits: int, group: int, *, portable: bool = False):
    if portable:
        return _quant.dequantize_packed(packed, scale, zero, bits, group)
    load()
    return torch.ops.kvexport.dequantize_unpack(packed, scale, zero, bits, group)


def pool_attention(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits: int, group: int, scale: float, *, portable: bool = False):
    if portable:
        return _attention.pool_attention(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale)
    load()
    return torch.ops.kvexport.pool_attention(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, float(scale))


def portable_decompositions() -> dict:
    """Decomposition table inlining the core-ATen reference for each kvexport op; use with
    ``ExportedProgram.run_decompositions(portable_decompositions())``."""
    load()
    return _library.portable_decompositions()
