"""Attention over the parts of the mixed-precision cache, as flash-style partial results.

Each part of the cache (sinks, window, the FP16 pool, each quantized pool, the chunk itself) yields
a *partial*: ``(o, m, l)`` with, per query row, ``m`` the max score, ``l = sum exp(s - m)`` and
``o = sum exp(s - m) * v``. :func:`merge_partials` combines them exactly into softmax attention.
This keeps each quantized pool independent, so a fused kernel (``kvexport::pool_attention``) can
work straight on packed codes and only over the filled prefix of its pool.

Shapes: queries ``q`` float32 ``[Hq, R, D]`` (R = query rows, batch folded in); keys/values of a
part ``[N, Hkv, D]`` with ``Hq % Hkv == 0`` (grouped-query attention: query head ``h`` reads KV
head ``h // (Hq // Hkv)``). Partials: ``o [Hq, R, D]``, ``m [Hq, R]``, ``l [Hq, R]``.
"""

from __future__ import annotations

import torch

from kvexport.kv import quant

# Finite stand-in for -inf so that fully masked rows stay NaN-free (exp(NEG - m) == 0 for real m).
NEG = -1.0e30


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[Hq, R, D]``, k ``[N, Hkv, D]`` -> scores ``[Hq, R, N]``."""
    hq, hkv = q.shape[0], k.shape[1]
    kh = k.permute(1, 0, 2).repeat_interleave(hq // hkv, dim=0)  # [Hq, N, D]
    return torch.matmul(q, kh.transpose(1, 2)) * scale


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Partial attention of ``q`` over float keys/values ``[N, Hkv, D]``.

    ``mask`` is bool, broadcastable to ``[Hq, R, N]`` (True = attend). Returns ``(o, m, l, p)`` where
    ``p [Hq, R, N]`` are the unnormalised weights ``exp(s - m)`` (used for attention features).
    """
    hq, hkv = q.shape[0], k.shape[1]
    s = torch.where(mask, _scores(q, k, scale), torch.full((), NEG))
    m = s.amax(dim=-1)
    p = torch.exp(s - m.unsqueeze(-1)) * mask
    vh = v.permute(1, 0, 2).repeat_interleave(hq // hkv, dim=0)  # [Hq, N, D]
    return torch.matmul(p, vh), m, p.sum(dim=-1), p


def pool_attention(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits: int, group: int, scale: float
):
    """Partial attention over a quantized pool; only slots ``[0, n_valid)`` count.

    ``k_packed`` uint8 ``[N, Hkv, D*bits/8]``, ``v_packed`` ``[N, Hkv, D*vb/8]`` (values at ``vb`` bits, read
    from the width: ``vb = bits`` except in K/V-split classes); scales/zeros fp16 ``[N, Hkv, D/group]``;
    ``n_valid`` int64 ``[1]``. Returns ``(o, m, l)`` as described in the module docstring. This is
    the reference (and portable) implementation of ``kvexport::pool_attention``.
    """
    k = quant.dequantize_packed(k_packed, k_scale, k_zero, bits, group)
    v = quant.dequantize_packed(v_packed, v_scale, v_zero, quant.packed_bits(v_packed, q.shape[-1]), group)
    valid = torch.arange(k.shape[0]) < n_valid
    o, m, l, _ = partial_attention(q, k, v, valid, scale)
    return o, m, l


def merge_partials(parts):
    """Combine partials ``[(o, m, l), ...]`` into attention output ``[Hq, R, D]`` and ``lse [Hq, R]``.

    ``lse`` is the log of the softmax normaliser, so a part's normalised weights are ``p * exp(m - lse)``.
    """
    m = torch.stack([p[1] for p in parts]).amax(dim=0)
    o = torch.zeros_like(parts[0][0])
    l = torch.zeros_like(parts[0][2])
    for po, pm, pl in parts:
        w = torch.exp(pm - m)
        o = o + po * w.unsqueeze(-1)
        l = l + pl * w
    return o / l.unsqueeze(-1), m + torch.log(l)
