"""The window schedule: where a token sits before it leaves the FP16 window, and when it leaves.

One rule, used by the cache (:mod:`kvexport.kv.cache`), the batched evaluation engine
(:mod:`kvexport.eval.batched`) and the calibration labels (:mod:`kvexport.controller.labels`):

* positions ``p < S`` (sinks) stay at full precision for good;
* position ``p >= S`` lives in window ring slot ``(p - S) % W`` and leaves the window when position
  ``p + W`` takes that slot over, at the commit of the chunk holding ``p + W``; with ``W = 0`` it
  leaves at the commit of its own chunk (within a chunk, tokens see each other at full precision);
* a token that leaves is placed in a pool; queries of later chunks see it as that pool stores it.

A context of ``n`` tokens fed in chunks of ``C`` from position 0 puts position ``p`` in chunk
``p // C``. Tensors are int64 / bool on the CPU.
"""

from __future__ import annotations

import torch

NEVER = 1 << 40  # eviction chunk of tokens that stay in the sinks or the window
NO_WINDOW_CHUNK = 32  # largest chunk of a cache without a window


def max_chunk(window: int) -> int:
    """Largest chunk one step takes: the window (so no token skips eviction), or 32 without one."""
    return window or NO_WINDOW_CHUNK


def ring_slot(pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Window ring slot ``[T]`` of positions ``pos [T]`` (``window > 0``); sink positions get the
    trash slot ``window``."""
    return torch.where(pos >= sinks, torch.remainder(pos - sinks, window), window)


def evict_chunk(n: int, sinks: int, window: int, chunk: int) -> torch.Tensor:
    """int64 ``[n]``: the chunk whose commit moves context token ``j`` out of the window, or
    :data:`NEVER` (sinks, and tokens still in the window after the whole context)."""
    j = torch.arange(n)
    successor = j + window  # the position that takes j's ring slot over (window 0: j itself)
    evict = torch.where(successor < n, torch.div(successor, chunk, rounding_mode="floor"), NEVER)
    return torch.where(j >= sinks, evict, NEVER)


def quantized_visibility(n: int, sinks: int, window: int, chunk: int) -> torch.Tensor:
    """bool ``[n, n]`` (query, key): query ``i`` sees key ``j <= i`` as its pool stores it (``j``
    left the window at the commit of a chunk before ``i``'s)."""
    i = torch.arange(n).unsqueeze(1)
    q_chunk = torch.div(i, chunk, rounding_mode="floor")
    return (torch.arange(n) <= i) & (evict_chunk(n, sinks, window, chunk).unsqueeze(0) < q_chunk)


def fp_resident(n_seen: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Tokens held at full precision in the sinks and the window after ``n_seen`` tokens (any shape)."""
    return n_seen.clamp(max=sinks) + (n_seen - sinks).clamp(min=0, max=window)
