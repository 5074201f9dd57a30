"""How many threads a decode step may use: one number per process.

Every runtime's own pool reads :func:`count` when a runner opens its program (ONNX Runtime's intra-op pool,
onnxruntime-genai's, llama.cpp's); :func:`kvexport.bench.set_threads` sets it, with torch's and ExecuTorch's pools
(``kvexport bench|eval --threads``). Unset, it is the number of CPUs this process may run on. Imports no torch (the
ONNX Runtime runner runs without it).
"""

from __future__ import annotations

import os

_count: int | None = None


def set_count(threads: int) -> None:
    global _count
    _count = threads


def count() -> int:
    return _count or len(os.sched_getaffinity(0))
