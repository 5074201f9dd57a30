"""Reference of ``kvexport::layer_attention``: one layer's whole attention step over the cache.

For a chunk of ``T`` tokens at positions ``p0 + [0, T)`` of one layer, batch 1, the op

0. takes the chunk's queries, keys and values as the projection writes them (token-major, before RoPE), splits
   them into heads and applies RoPE (``cos``, ``sin`` of the chunk's positions, Hugging Face's "rotate_half"
   layout: :func:`kvexport.models.llama.apply_rope`); ``rotate`` is a bit mask (:attr:`CacheLayout.rotation`): with
   bit 1 (``--kv-rotate``) it then rotates queries and keys (:func:`kvexport.kv.quant.rotate`: the cache holds
   rotated keys, scores are unchanged), with bit 2 (``--kv-rotate-values``) the values, and rotates the attention
   output back (the same transform: ``H @ H = I``). So the graph around the op is the projection's ``Split``
   before it and the output projection after it, nothing else;

1. attends the chunk's queries over sinks + FP16 ring window + the FP16 pool + every quantized
   pool + the chunk itself (causal), reading only filled slots;
2. optionally (``features``) returns the attention each window slot and each chunk token
   received from the chunk's queries, as :meth:`MixedKVCache._attention_features` defines it;
3. writes the chunk's K/V (rounded to the cache's float dtype) into the sinks (``p < S``) or the
   ring (slot ``(p - S) % W``), after **staging** what eviction still needs in ``evict_k/v``.

Staging (why the kernel may overwrite the ring): the old occupants of the chunk's ring slots leave
the window this step, but they are quantized only after this step's attention and features, by
the eviction step. So before overwriting slot ``(p - S) % W`` with chunk token ``j``, the op copies
its old K/V into row ``j`` of ``evict_k/v``; with ``W == 0`` row ``j`` is chunk token ``j`` itself
(it leaves the "window" at once); a token that goes to the sinks leaves zeros in its row. The
eviction step then reads ``evict_k/v[:T]`` where ``commit`` reads ``win_k/v[ring]`` today.

Which slots are filled follows from a small int32 ``state [5] = (p0, fill2, fill4, fill8, fill16)``
(shapes stay static): sinks ``[0, min(p0, S))``, window ``[0, clamp(p0 - S, 0, W))`` (the ring fills
front to back from position ``S``, and softmax does not care about slot order), pool ``c`` slots
``[0, fill_c)`` (every count clamped to its part's capacity).

Shapes (``S`` sinks, ``W`` window, ``L`` layers, ``H`` KV heads, ``Hq`` query heads, ``D`` head_dim):
``q [1, T, Hq·D]`` f32, new ``k, v [1, T, H·D]`` f32 (the projection's outputs, before RoPE and the rotation),
``cos, sin [T, D]`` f32; ``sink_k/v [S+1, L, H, D]``,
``win_k/v [W+1, L, H, D]``, ``evict_k/v [Tmax >= T, L, H, D]`` in the cache's float dtype (fp16 or
fp32); ``pools`` in :data:`POOL_NAMES` order with the (layer-major) shapes of :mod:`kvexport.kv.cache` (each side's
bits follow from its packed width, so a class may store values coarser than keys). Returns
``out [1, T, Hq·D]`` f32 (the output projection's input) and ``recv [W + T, 3]`` f32: window rows then chunk
rows, columns (sum over query rows of the head-mean normalised weight, sum of the head variance, observing
rows), zeros without ``features``. This Python function is the oracle the C++ kernel is tested against.
"""

from __future__ import annotations

import torch

from kvexport.kv import attention, quant
from kvexport.kv.cache import pool_rows
from kvexport.models import llama

POOL_NAMES = ("pool16_k", "pool16_v") + tuple(
    f"pool{b}_{name}" for b in (2, 4, 8) for name in ("k", "ks", "kz", "v", "vs", "vz")
)
WRITTEN_PARTS = ("sink_k", "sink_v", "win_k", "win_v", "evict_k", "evict_v")  # the cache parts the op writes
STATE_SIZE = 5  # p0, fill2, fill4, fill8, fill16
N_RECV = 3


def filled(state: torch.Tensor, sinks: int, window: int, caps: list[int]) -> tuple[int, int, int, list[int]]:
    """``state`` -> (p0, filled sinks, filled window slots, pool fills [2, 4, 8, 16]) as ints; each
    count is clamped to what its part can hold (the trash slot is never read)."""
    p0, *fills = (max(int(x), 0) for x in state.tolist())
    return p0, min(p0, sinks), min(max(p0 - sinks, 0), window), [min(f, c) for f, c in zip(fills, caps)]


def layer_attention(q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, pools, layer: int,
                    group: int, scale: float, features: bool, rotate: int):
    """See the module docstring; mutates ``sink_k/v``, ``win_k/v``, ``evict_k/v``."""
    S, W = sink_k.shape[0] - 1, win_k.shape[0] - 1
    q, k, v = llama.rope_heads(q, k, v, (cos, sin), sink_k.shape[3])
    q, k, v = q[0], k[0], v[0]  # [Hq, T, D], [H, T, D]
    if rotate & quant.ROTATE_KEYS:
        q, k = quant.rotate(q), quant.rotate(k)
    if rotate & quant.ROTATE_VALUES:
        v = quant.rotate(v)
    hq, t, _ = q.shape
    pool = dict(zip(POOL_NAMES, pools))
    n_layers = sink_k.shape[1]
    caps = [pool[f"pool{c}_k"].shape[0] // n_layers - 1 for c in (2, 4, 8, 16)]
    p0, n_s, n_w, fills = filled(state, S, W, caps)
    fp = sink_k.dtype
    k, v = k.to(fp).float(), v.to(fp).float()  # what the cache holds: later steps see the same
    keys = [sink_k[:n_s, layer], win_k[:n_w, layer], pool_rows(pool["pool16_k"], n_layers, layer, fills[3])]
    values = [sink_v[:n_s, layer], win_v[:n_w, layer], pool_rows(pool["pool16_v"], n_layers, layer, fills[3])]
    kf, vf = torch.cat(keys).float(), torch.cat(values).float()  # [N, H, D]
    parts = []
    if kf.shape[0]:
        o, m, l, _ = attention.partial_attention(q, kf, vf, torch.ones(kf.shape[0], dtype=torch.bool), scale)
        parts.append((o, m, l))
    for i, bits in enumerate((2, 4, 8)):
        if fills[i]:
            kv = [pool_rows(pool[f"pool{bits}_{n}"], n_layers, layer, fills[i])
                  for n in ("k", "ks", "kz", "v", "vs", "vz")]
            parts.append(attention.pool_attention(q, *kv, torch.tensor([fills[i]]), bits, group, scale))
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # [query row, chunk key]
    kc, vc = k.transpose(0, 1), v.transpose(0, 1)  # [T, H, D]
    o, m, l, _ = attention.partial_attention(q, kc, vc, causal, scale)
    parts.append((o, m, l))
    out, lse = attention.merge_partials(parts)  # [Hq, T, D], [Hq, T]
    if rotate & quant.ROTATE_VALUES:
        out = quant.rotate(out)  # back from the values' basis

    recv = torch.zeros(W + t, N_RECV)
    if features:
        n_keys = (n_s + n_w + sum(fills) + torch.arange(1, t + 1)).float()  # visible keys per query row
        recv[:n_w] = _received(q, win_k[:n_w, layer].float(), lse, n_keys, scale, torch.ones(t, n_w, dtype=torch.bool))
        recv[W:] = _received(q, kc, lse, n_keys, scale, causal.tril(-1))

    for j in range(t):
        pos = p0 + j
        if pos < S:
            sink_k[pos, layer], sink_v[pos, layer] = k[:, j].to(fp), v[:, j].to(fp)
            evict_k[j, layer], evict_v[j, layer] = 0, 0
        elif W:
            slot = (pos - S) % W
            evict_k[j, layer], evict_v[j, layer] = win_k[slot, layer], win_v[slot, layer]
            win_k[slot, layer], win_v[slot, layer] = k[:, j].to(fp), v[:, j].to(fp)
        else:
            evict_k[j, layer], evict_v[j, layer] = k[:, j].to(fp), v[:, j].to(fp)
    return llama.merge_heads(out.unsqueeze(0)), recv


def _received(q, keys, lse, n_keys, scale, seen):
    """Attention that ``keys [N, H, D]`` received from the rows ``seen [T, N]`` of ``q`` (weights
    normalised so uniform attention over the visible keys is 1) -> ``[N, 3]``."""
    if not keys.shape[0]:
        return torch.zeros(0, N_RECV)
    w = torch.exp(attention._scores(q, keys, scale) - lse.unsqueeze(-1)) * n_keys.view(1, -1, 1)  # [Hq, T, N]
    mask = seen.float()
    return torch.stack([(w.mean(0) * mask).sum(0), (w.var(0, unbiased=False) * mask).sum(0), mask.sum(0)], -1)
