"""Measured per-token sensitivity to KV quantization, and the labels derived from it.

Method (documented in ``calibration/README.md``): for a window of text we run a *gated* copy of the
model's forward in which every token ``j`` outside the sinks has its keys and values (all layers)
replaced by ``kv_j + g_j * (Q_c(kv_j) - kv_j)`` for the queries that see it after it left the FP16
window (:func:`kvexport.kv.schedule.quantized_visibility`, the rule the cache runs). ``Q_c`` is the
cache's group-wise quantizer at class ``c``; ``g`` is a per-token gate in ``[0, 1]``.

The quantity we measure is ``K(g) = sum_i KL(p_fp16(. | <i) || p_g(. | <i))`` over all positions.
``K(0) = 0``, ``K(1)`` is the measured KL when *every* token sits at class ``c``. By integrated
gradients along ``g = t * 1``, ``K(1) = sum_j A_j`` with ``A_j = int_0^1 dK/dg_j(t) dt``, estimated
with a midpoint rule; ``A_j`` is token ``j``'s share of the measured KL (the shares add up to the
measured total, which :func:`completeness` checks). Validation against direct measurement
(quantizing only the tokens the attribution calls cheapest / dearest / a random subset) is in
:func:`subset_kl`.

Label of a token at threshold ``tau``: the cheapest class ``c`` with ``A_j(c) <= tau`` (else 16).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from kvexport.kv import quant
from kvexport.kv.policy import CLASSES
from kvexport.kv.schedule import quantized_visibility
from kvexport.models.llama import Transformer, rope_cos_sin, rope_heads

QUANT_CLASSES = (2, 4, 8)


def gated_forward(model: Transformer, tokens: torch.Tensor, gates: dict[int, torch.Tensor] | None, group: int,
                  qvis: torch.Tensor, rotate: int = 0, clip=quant.NO_CLIP) -> torch.Tensor:
    """Full-sequence forward (batch 1, positions from 0) with gated quantization of K/V.

    tokens int64 ``[T]``; gates ``{class: gate float [T]}``, a class being ``bits`` or a ``(key bits, value bits)``
    pair, 16 for a side kept at fp16 (a gate may require grad; a token whose
    gates are 0 stays fp16, one with gate 1 at ``bits`` is stored at that class) or None (pure fp16
    storage); returns log-probs ``[T, V]``. Keys are rounded to fp16 after RoPE, as the cache stores them;
    ``rotate`` is the cache's mask (:attr:`kvexport.kv.cache.CacheLayout.rotation`): with bit 1 (``--kv-rotate``)
    queries and keys are multiplied by ``hadamard(D)`` first, with bit 2 (``--kv-rotate-values``) values, and the
    attention output back, as the cache does, so each side is stored and quantized in the rotated basis.
    ``clip``: (key, value) clip ratios per
    class (:func:`kvexport.kv.quant.parse_clip`; the cache layout's ``key_clip`` / ``value_clip``).
    """
    args = model.args
    T = tokens.shape[0]
    pos = torch.arange(T)
    rope = rope_cos_sin(pos, args.head_dim, args.rope_theta)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scale = 1.0 / math.sqrt(args.head_dim)
    rep = args.n_heads // args.n_kv_heads
    qv = qvis.float()
    rotation = quant.hadamard(args.head_dim) if rotate else None  # H @ H = I
    def block(layer, x, gates):
        att = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = rope_heads(*att.project(h), rope, args.head_dim)  # [1, Hq, T, D], [1, H, T, D] x 2
        if rotate & quant.ROTATE_KEYS:
            q, k = q @ rotation, k @ rotation
        if rotate & quant.ROTATE_VALUES:
            v = v @ rotation
        k = k + (k.detach().half().float() - k.detach())  # fp16 storage, straight-through
        v = v + (v.detach().half().float() - v.detach())
        kh, vh = k[0].repeat_interleave(rep, 0), v[0].repeat_interleave(rep, 0)  # [Hq, T, D]
        s = q[0] @ kh.transpose(-1, -2) * scale  # [Hq, T, T]
        if gates:
            gdk = gdv = 0.0
            for cls, gate in gates.items():
                with torch.no_grad():  # quantization error, treated as a constant direction
                    dk, dv = (_error(x.detach(), bits, group, clip[side])
                              for side, (x, bits) in enumerate(zip((k, v), _sides(cls))))
                gdk = gdk + (gate.view(1, 1, T, 1) * dk)[0].repeat_interleave(rep, 0)  # [Hq, T, D]
                gdv = gdv + (gate.view(1, 1, T, 1) * dv)[0].repeat_interleave(rep, 0)
            s = s + qv * (q[0] @ gdk.transpose(-1, -2) * scale)
        s = s.masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = p @ vh
        if gates:
            o = o + (p * qv) @ gdv
        if rotate & quant.ROTATE_VALUES:
            o = o @ rotation
        o = o.unsqueeze(0).transpose(1, 2).reshape(1, T, -1)
        x = x + att.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    x = model.embed_tokens(tokens.unsqueeze(0))
    grad = any(g.requires_grad for g in (gates or {}).values()) and torch.is_grad_enabled()
    for layer in model.layers:
        if grad:  # recompute activations in backward: memory per layer instead of per model
            x = checkpoint(block, layer, x, gates, use_reentrant=False)
        else:
            x = block(layer, x, gates)
    return torch.log_softmax(model.lm_head(model.norm(x))[0], dim=-1)


def _sides(cls) -> tuple[int, int]:
    """(key bits, value bits) of a gate's class: ``bits`` for both, or a ``(key, value)`` pair (16: kept)."""
    return (cls, cls) if isinstance(cls, int) else tuple(cls)


def _error(x: torch.Tensor, bits: int, group: int, clips: tuple[float, ...]) -> torch.Tensor:
    """Quantization error ``Q(x) - x`` at ``bits`` (0 at 16) with that side's clip ratio."""
    if bits >= 16:
        return torch.zeros_like(x)
    clip = clips[quant.SUPPORTED_BITS.index(bits)]
    return quant.dequantize(*quant.quantize(x, bits, group, clip), group) - x


def _kl_sum(ref: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    return (ref.exp() * (ref - lp)).sum()


def attribute(model: Transformer, tokens: torch.Tensor, *, sinks: int, window: int, chunk: int, group: int,
              steps: dict[int, int], ref: torch.Tensor | None = None, rotate: int = 0,
              clip=quant.NO_CLIP) -> dict:
    """Integrated-gradients attribution of the measured KL to each token, per quantized class.

    Returns ``{"ref": log-probs [T, V], "attr": float32 [T, 3] (classes 2, 4, 8; nats of summed KL)}``.
    """
    T = tokens.shape[0]
    qvis = quantized_visibility(T, sinks, window, chunk)
    for p in model.parameters():
        p.requires_grad_(False)
    if ref is None:
        with torch.no_grad():
            ref = gated_forward(model, tokens, None, group, qvis, rotate, clip)
    attr = torch.zeros(T, len(QUANT_CLASSES))
    for ci, bits in enumerate(QUANT_CLASSES):
        n = steps.get(bits, 1)
        for k in range(n):
            t = (k + 0.5) / n
            gate = torch.full((T,), t, requires_grad=True)
            loss = _kl_sum(ref, gated_forward(model, tokens, {bits: gate}, group, qvis, rotate, clip))
            (g,) = torch.autograd.grad(loss, gate)
            attr[:, ci] += g / n
    return {"ref": ref, "attr": attr}


@torch.no_grad()
def measured_kl(model: Transformer, tokens: torch.Tensor, gates: dict[int, torch.Tensor], *, sinks: int,
                window: int, chunk: int, group: int, ref: torch.Tensor, rotate: int = 0,
                clip=quant.NO_CLIP) -> float:
    """Directly measured summed KL with ``gates`` (``{bits: 0/1 per token}``, at most one 1 per token)."""
    qvis = quantized_visibility(tokens.shape[0], sinks, window, chunk)
    gates = {b: g.float() for b, g in gates.items()}
    return float(_kl_sum(ref, gated_forward(model, tokens, gates, group, qvis, rotate, clip)))


def labels_at(attr: torch.Tensor, tau: float) -> torch.Tensor:
    """Cheapest class (index into ``CLASSES``) whose attributed KL is at most ``tau``; 16-bit otherwise."""
    ok = torch.cat([attr <= tau, torch.ones(attr.shape[0], 1, dtype=torch.bool)], dim=1)  # 16-bit always ok
    return ok.float().argmax(dim=1)


def class_costs(attr: torch.Tensor) -> torch.Tensor:
    """Attributed KL per class ``[N, 4]`` (16-bit costs nothing; negative attributions clipped to 0)."""
    return torch.cat([attr.clamp(min=0), torch.zeros(attr.shape[0], 1)], dim=1)


assert len(QUANT_CLASSES) + 1 == len(CLASSES)
