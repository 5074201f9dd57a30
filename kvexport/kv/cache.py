"""The mixed-precision KV cache: fixed-size state, per-token precision classes.

Layout (all buffers have static shapes; ``L`` layers, ``H`` KV heads, ``D`` head_dim, ``G`` group):

Every write is a 1-D ``index_put_`` (the one scatter every backend runs in place): the float parts are
slot-major (slot first, then layer); the pools are **layer-major**, layer ``l``'s ``C+1`` slots being the
rows ``[l·(C+1), (l+1)·(C+1))`` (:func:`pool_rows`, :func:`pool_index`), so one layer's rows are one
contiguous run that attention streams (slot-major rows sat ``L·H`` rows apart: a cache miss and often a
TLB miss each, the layer kernel's main cost at long context):

* ``sink_k/v``   fp ``[S+1, L, H, D]``   the first ``S`` positions, kept at full precision;
* ``win_k/v``    fp ``[W+1, L, H, D]``   recent window, a ring: position ``p >= S`` lives in slot
  ``(p - S) % W`` (:mod:`kvexport.kv.schedule`); ``win_pos [W+1]`` (-1 = empty) and
  ``win_feat [W+1, 6]`` (features so far);
* one **pool** per class, filled front to back (``fill [4]`` counts), never evicted:
  ``pool16_k/v`` fp ``[L·(C16+1), H, D]`` and for b in 2, 4, 8: ``pool{b}_k`` uint8
  ``[L·(Cb+1), H, D*b/8]`` (packed key codes), ``pool{b}_v`` uint8 ``[L·(Cb+1), H, D*vb/8]`` (value
  codes at the class's value bits ``vb <= b``, ``--kv-classes``, e.g. ``k4v2``; ``vb = b`` by default)
  with fp16 ``pool{b}_ks/kz/vs/vz [L·(Cb+1), H, D/G]`` (scale and zero point per group; the six
  together: :class:`QuantPool`). Every reader takes a side's bits from its packed width;
  ``pool_pos{c} [Cc+1]`` records which position sits in each slot.

The last slot of every buffer (of every layer's run in a pool) is a *trash* slot: writes that must not
land anywhere go there, so a step is branch-free and exports with static shapes. It is never attended to.

Why pools: the memory is what the buffers hold (``nbytes``), sized at build time from the policy's
class shares (``--kv-budget-bits``); nothing is allocated at 16 bits "just in case".

A step works on a chunk of ``T`` tokens: ``begin`` returns a :class:`CacheStep`, ``attend(step, layer,
...)`` per layer records the chunk's keys and values in it, and ``commit(step, tokens, logits)``
writes them. Attention covers sinks + window + all pools + the chunk itself (causal). ``commit`` then

1. computes the chunk's features (rarity, entropy, max-prob; attention they and the window tokens
   received from this step's queries in the last layer);
2. evicts the tokens that leave the window (:mod:`kvexport.kv.schedule`; ``T <= W``: the old
   occupants of the chunk's ring slots; ``W == 0``: the chunk tokens themselves) into pools: the
   policy picks a class, and the **overflow rule** places each token in its class if that pool has
   room, otherwise in the nearest cheaper class with room, otherwise in the nearest dearer one (ties
   in one step are served in position order; :mod:`kvexport.kv.allocate`). The same rule runs in every backend;
3. writes the chunk into the window ring (and sinks).

With ``layer_kernel`` (``--ops fused``) each layer's ``attend`` is ONE
``kvexport::layer_attention`` call (:mod:`kvexport.kv.layer_attention`): it attends every part,
returns the last layer's attention features, and already writes the chunk into the sinks / ring,
staging the ring's old occupants in ``evict_k/v [max_chunk, L, H, D]``; ``commit`` then evicts from
those staged rows (placing them with one ``kvexport::allocate`` call) and writes only positions and
features into the window. With ``onnx_kernel`` too (ONNX programs, whose graph must stay functional) the
op also returns each layer's staged rows, which ``commit`` reads instead of ``evict_k/v``, and the
overflow rule runs in standard ops.

Eviction happens at step granularity: within one chunk, tokens see each other at full precision.
Keys are stored after RoPE, optionally multiplied by an orthonormal Hadamard matrix (queries get
the same rotation, so scores are unchanged while outliers spread across channels before quantizing);
values optionally too (``rotate_values``, ``--kv-rotate-values``): the cache holds ``v @ H`` and the attention
output, a weighted sum of rotated values, is multiplied by ``H`` again (``H @ H = I``) before the output
projection, so only the quantization error changes (a 2-bit value grid then spans a near-Gaussian group
instead of one spent on outlier channels: calibration/README.md, "2-bit values").
Each quantized class may clip its grid to the middle of each group's range, keys and values apart
(``key_clip`` / ``value_clip`` of the layout; the rule is :func:`kvexport.kv.quant.quantize`'s).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from kvexport.kv import attention, quant, schedule
from kvexport.kv.allocate import allocate
from kvexport.kv.policy import CLASSES, Policy
from kvexport.models.llama import merge_heads, rope_heads

N_FEAT_STATE = 6  # rarity, entropy, max_prob, attn_received_sum, attn_head_var_sum, n_observations
QUANT_BITS = (2, 4, 8)


def pool_rows(buf: torch.Tensor, n_layers: int, layer: int, n: int) -> torch.Tensor:
    """Slots ``[0, n)`` of ``layer`` in a layer-major pool buffer ``[L·(C+1), ...]`` -> ``[n, ...]`` (contiguous)."""
    start = layer * (buf.shape[0] // n_layers)
    return buf[start : start + n]


def pool_index(slots: torch.Tensor, layer_base: torch.Tensor) -> torch.Tensor:
    """Slots int64 ``[T]`` and ``layer_base`` ``[L]`` (``l·(C+1)``) -> pool rows ``[T·L]`` in the order of
    values ``[T, L, ...]`` flattened: ``buf.index_put_((pool_index(...),), values.flatten(0, 1))`` writes
    token ``j`` of every layer into slot ``slots[j]``."""
    return (slots.view(-1, 1) + layer_base.view(1, -1)).reshape(-1)


@dataclass(frozen=True)
class CacheLayout:
    """Static description of a cache: sizes of every buffer follow from it."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_context: int
    sinks: int
    window: int
    group: int
    capacities: tuple[int, int, int, int]  # pooled tokens per class, in CLASSES order
    fp_dtype: str = "float16"  # storage of sinks, window and the 16-bit pool ("float32" for fp32)
    rotate_keys: bool = False
    key_clip: tuple[float, float, float] = (1.0, 1.0, 1.0)  # clip ratio of keys at 2, 4, 8 bits (quant.quantize)
    value_clip: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the same for values
    value_bits: tuple[int, int, int] = quant.EQUAL_VALUE_BITS  # values of the 2-, 4-, 8-bit-key classes (--kv-classes)
    rotate_values: bool = False  # --kv-rotate-values: values stored as v @ H, the attention output rotated back

    @property
    def rotation(self) -> int:
        """The layer kernel's ``rotate`` argument (:func:`kvexport.kv.quant.rotation_mask`)."""
        return quant.rotation_mask(self.rotate_keys, self.rotate_values)

    @property
    def torch_fp_dtype(self) -> torch.dtype:
        return getattr(torch, self.fp_dtype)

    def class_bytes_per_token(self) -> list[int]:
        """Bytes one token occupies in each class, over all layers, keys and values."""
        per_head = []  # keys + values of one (layer, KV head)
        for c in CLASSES:
            if c == 16:
                per_head.append(2 * self.head_dim * torch.finfo(self.torch_fp_dtype).bits // 8)
            else:
                per_head.append(sum(self.head_dim * self.side(c, s)[0] // 8 + 2 * 2 * (self.head_dim // self.group)
                                    for s in (0, 1)))
        return [self.n_layers * self.n_kv_heads * b for b in per_head]

    def side(self, bits: int, side: int) -> tuple[int, float]:
        """(bits, clip ratio) at which the class whose keys take ``bits`` stores its keys (``side`` 0) or its
        values (1): values at the class's ``value_bits``, each side clipped as ``--kv-clip`` says for its bits."""
        b = bits if side == 0 else self.value_bits[QUANT_BITS.index(bits)]
        return b, (self.key_clip, self.value_clip)[side][QUANT_BITS.index(b)]

    def class_names(self) -> list[str]:
        """``k<b>v<c>`` (key and value bits) per quantized class, ``16`` for the float one."""
        return [f"k{c}v{self.side(c, 1)[0]}" if c != 16 else "16" for c in CLASSES]

    def elements_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def build(
        cls, *, n_layers, n_kv_heads, head_dim, max_context, sinks, window, group, fractions, fp_dtype, rotate_keys,
        clip=quant.NO_CLIP, value_bits=quant.EQUAL_VALUE_BITS, rotate_values=False,
    ):
        """Size the pools: class ``c`` gets ``ceil(fraction_c * pooled tokens)`` slots; ``clip``: (key, value)
        clip ratios per bit-width (:func:`kvexport.kv.quant.parse_clip`); ``value_bits``: the classes' value
        bits (:func:`kvexport.kv.quant.parse_classes`). ``rotate_keys`` / ``rotate_values`` hold only where a
        quantized pool has slots (the rotation changes nothing else)."""
        if sinks < 0 or window < 0 or sinks + window > max_context:
            raise ValueError(f"sinks ({sinks}) + window ({window}) must fit in the context ({max_context})")
        for b in QUANT_BITS:
            quant.check_layout(head_dim, b, group)
        n_pool = max_context - sinks - window
        caps = tuple(int(math.ceil(f * n_pool - 1e-9)) if f > 0 else 0 for f in fractions)
        if sum(caps) < n_pool:  # rounding guard: every pooled token must have a slot somewhere
            i = max(range(len(caps)), key=lambda j: fractions[j])
            caps = tuple(c + (n_pool - sum(caps) if j == i else 0) for j, c in enumerate(caps))
        quantized = any(caps[: len(QUANT_BITS)])
        rotate_keys, rotate_values = rotate_keys and quantized, rotate_values and quantized
        if rotate_keys or rotate_values:
            quant.check_rotation(head_dim)
        return cls(n_layers, n_kv_heads, head_dim, max_context, sinks, window, group, caps, fp_dtype, rotate_keys,
                   *clip, tuple(value_bits), rotate_values)


class QuantPool(NamedTuple):
    """The six buffers of one quantized class ``b``, each ``[L·(C+1), H, ...]`` (layer-major), or one layer's rows."""

    k: torch.Tensor  # uint8 [..., D*b/8] packed key codes
    ks: torch.Tensor  # fp16 [..., D/G] key scale per group
    kz: torch.Tensor  # fp16 [..., D/G] key zero point per group
    v: torch.Tensor  # uint8 [..., D*vb/8] packed value codes (vb: the class's value bits)
    vs: torch.Tensor  # fp16 [..., D/G]
    vz: torch.Tensor  # fp16 [..., D/G]


@dataclass
class CacheStep:
    """What one step carries from :meth:`MixedKVCache.begin` through ``attend`` (per layer) to ``commit``."""

    input_pos: torch.Tensor  # int64 [1]: position of the chunk's first token
    n_fill: tuple[int, ...]  # pool prefix attended per class: filled counts (trimmed) or capacities
    new_k: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H, T, D], as the cache stores them
    new_v: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H, T, D]
    received: tuple | torch.Tensor | None = None  # last layer's attention (batch 1) for the attention features
    kernel_state: torch.Tensor | None = None  # int32 [5] (p0, fills) for kvexport::layer_attention
    staged_k: list[torch.Tensor] = field(default_factory=list)  # per layer [T, H, D]: rows the ONNX kernel staged
    staged_v: list[torch.Tensor] = field(default_factory=list)  # for eviction (onnx_kernel)


class MixedKVCache(nn.Module):
    """State + step logic of the mixed-precision cache (see module docstring).

    ``trim=True`` (eager use) slices pools to their filled prefix with Python ints, so cost follows
    the context; ``trim=False`` (export) attends over full capacity with masks. Both give the same
    numbers. Key rotation: ``x @ hadamard(D)``, one MatMul, eager and in export graphs (ORT's MatMul
    rounds like torch's here: an ONNX program's parity KL is 20x lower than against the transform
    below; in a portable ExecuTorch program 8 more calls outside XNNPACK per layer, ~2%: as a linear,
    the XNNPACK partitioner finds dependency cycles, as with RoPE's); the layer kernel runs
    :func:`kvexport.kv.quant.rotate` (the fast transform, equal up to fp32 rounding) inside the op, and
    ``fwht=True`` makes the other paths do the same: the reference of a layer-kernel program, whose
    2-bit codes would otherwise part from the program's where an fp32 ulp moves a key across a
    rounding boundary (seen: logits 0.009 apart after 60 tiny-model steps).
    """

    def __init__(
        self,
        layout: CacheLayout,
        policy: Policy,
        rarity: torch.Tensor,
        trim: bool = True,
        fused_ops: bool = False,
        layer_kernel: bool = False,
        fwht: bool = False,
        onnx_kernel: bool = False,
    ):
        super().__init__()
        self.layout = layout
        self.policy = policy
        self.trim = trim
        self.fused_ops = fused_ops  # True: our kvexport:: custom ops; False: their core-ATen reference
        self.layer_kernel = layer_kernel  # True: one kvexport::layer_attention per layer (batch 1)
        # the layer kernel's ONNX form: it returns the rows it staged for eviction (an exported graph cannot read
        # evict_k/v after the kernel wrote them in place); the overflow rule in standard ops
        self.onnx_kernel = onnx_kernel
        self.fwht = fwht  # rotate with the layer kernel's arithmetic (the reference of its programs)
        L, H, D, S, W = layout.n_layers, layout.n_kv_heads, layout.head_dim, layout.sinks, layout.window
        fp = layout.torch_fp_dtype
        self.register_buffer("rarity", rarity.float(), persistent=False)
        if layout.rotation and not (layer_kernel or fwht):
            self.register_buffer("rotation", quant.hadamard(D), persistent=False)
        self.register_buffer("sink_k", torch.zeros(S + 1, L, H, D, dtype=fp))
        self.register_buffer("sink_v", torch.zeros(S + 1, L, H, D, dtype=fp))
        self.register_buffer("win_k", torch.zeros(W + 1, L, H, D, dtype=fp))
        self.register_buffer("win_v", torch.zeros(W + 1, L, H, D, dtype=fp))
        self.register_buffer("win_pos", torch.full((W + 1,), -1, dtype=torch.int64))
        self.register_buffer("win_feat", torch.zeros(W + 1, N_FEAT_STATE))
        for c, cap in zip(CLASSES, layout.capacities):
            self.register_buffer(f"pool_pos{c}", torch.full((cap + 1,), -1, dtype=torch.int64))
            rows = L * (cap + 1)  # layer-major: layer l's slots are rows [l(cap+1), (l+1)(cap+1))
            self.register_buffer(f"layer_base{c}", torch.arange(L) * (cap + 1), persistent=False)
            if c == 16:
                self.register_buffer("pool16_k", torch.zeros(rows, H, D, dtype=fp))
                self.register_buffer("pool16_v", torch.zeros(rows, H, D, dtype=fp))
                continue
            for side, kv in enumerate("kv"):
                width = D * layout.side(c, side)[0] // 8
                self.register_buffer(f"pool{c}_{kv}", torch.zeros(rows, H, width, dtype=torch.uint8))
                self.register_buffer(f"pool{c}_{kv}s", torch.zeros(rows, H, D // layout.group, dtype=torch.float16))
                self.register_buffer(f"pool{c}_{kv}z", torch.zeros(rows, H, D // layout.group, dtype=torch.float16))
        if layer_kernel:  # rows leaving the window this step, staged by the kernel for commit
            self.register_buffer("evict_k", torch.zeros(self.max_chunk, L, H, D, dtype=fp))
            self.register_buffer("evict_v", torch.zeros(self.max_chunk, L, H, D, dtype=fp))
        self.register_buffer("fill", torch.zeros(len(CLASSES), dtype=torch.int64))
        self.register_buffer("n_seen", torch.zeros(1, dtype=torch.int64))
        # constants (non-persistent: not state, not counted in nbytes)
        self.register_buffer("caps", torch.tensor(layout.capacities, dtype=torch.int64), persistent=False)
        self.register_buffer(
            "class_bytes", torch.tensor(layout.class_bytes_per_token(), dtype=torch.float32), persistent=False
        )
        self.register_buffer("is_fp_class", torch.tensor([0, 0, 0, 1], dtype=torch.int64), persistent=False)
        self.register_buffer("allocated", torch.tensor([float(self.nbytes())]), persistent=False)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def max_chunk(self) -> int:
        """Largest chunk one step takes (:func:`schedule.max_chunk`)."""
        return schedule.max_chunk(self.layout.window)

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The mutable state (persistent buffers), by name."""
        return {n: b for n, b in self.named_buffers() if "." not in n and n in self.state_dict()}

    def nbytes(self) -> int:
        """Bytes of all state buffers (trash slots, positions and feature slots included)."""
        return sum(b.numel() * b.element_size() for b in self.state_buffers().values())

    def reset(self) -> None:
        for name, buf in self.state_buffers().items():
            buf.fill_(-1 if name.startswith(("win_pos", "pool_pos")) else 0)

    def stats(self) -> torch.Tensor:
        """float32 ``[8]``: bytes allocated, bytes used, average bits per element over cached tokens,
        tokens at 2/4/8/16 bits (sinks and window count as 16), tokens cached."""
        n_fp = schedule.fp_resident(self.n_seen, self.layout.sinks, self.layout.window)
        return self.stats_for_counts(self.fill + self.is_fp_class * n_fp)

    def stats_for_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Cached tokens per class int64 ``[..., 4]`` (sinks and window in the 16-bit count) ->
        the :meth:`stats` vector float32 ``[..., 8]`` of a cache holding them."""
        used = (counts.float() * self.class_bytes).sum(-1, keepdim=True)
        n = counts.sum(-1, keepdim=True)
        avg_bits = used * 8 / (n.clamp(min=1).float() * self.layout.elements_per_token())
        return torch.cat([self.allocated.expand_as(used), used, avg_bits, counts.float(), n.float()], dim=-1)

    # ------------------------------------------------------------------ step
    def quant_pool(self, bits: int) -> QuantPool:
        """The six buffers of the ``bits`` pool."""
        return QuantPool(*(getattr(self, f"pool{bits}_{name}") for name in QuantPool._fields))

    def begin(self, input_pos: torch.Tensor) -> CacheStep:
        """Start a step over a chunk whose first token sits at ``input_pos`` int64 ``[1]``."""
        n_fill = tuple(int(f) for f in self.fill.tolist()) if self.trim else self.layout.capacities
        kernel_state = torch.cat([input_pos, self.fill]).to(torch.int32) if self.layer_kernel else None
        return CacheStep(input_pos, n_fill, kernel_state=kernel_state)

    def _rotate(self, x: torch.Tensor, on: bool) -> torch.Tensor:
        """``x @ hadamard(D)`` where ``on`` (the layout's key or value rotation), else ``x``."""
        if not on:
            return x
        return quant.rotate(x) if self.fwht else x @ self.rotation

    def attend(self, step: CacheStep, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: tuple) -> torch.Tensor:
        """The projection's q ``[B, T, Hq·D]``, new k/v ``[B, T, H·D]`` (before RoPE) and the step's RoPE tables ->
        attention output ``[B, T, Hq·D]``. Records the chunk's k/v (and, in the last layer, the attention it needs
        for features) in ``step``."""
        if self.layer_kernel:  # the kernel applies RoPE and rotates q, k and v itself
            return self._layer_attention(step, layer, q, k, v, rope)
        return merge_heads(self._attend(step, layer, *rope_heads(q, k, v, rope, self.layout.head_dim)))

    def _attend(self, step: CacheStep, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[B, Hq, T, D]``, new k/v ``[B, H, T, D]`` (after RoPE) -> ``[B, Hq, T, D]``."""
        lay = self.layout
        fp = lay.torch_fp_dtype
        b, hq, t, d = q.shape
        scale = 1.0 / math.sqrt(d)
        q = self._rotate(q, lay.rotate_keys)
        k = self._rotate(k, lay.rotate_keys).to(fp).float()  # what the cache will hold, so later steps see the same
        v = self._rotate(v, lay.rotate_values).to(fp).float()
        step.new_k.append(k)
        step.new_v.append(v)
        rows = q.transpose(0, 1).reshape(hq, b * t, d)
        # Float parts (sinks, window, FP16 pool, and in portable mode the dequantized pools) are
        # concatenated into ONE partial attention: fewer ops to run and to lower. With fused ops each
        # quantized pool is one kernel call over its filled prefix instead.
        keys, values, masks, parts = [], [], [], []
        if lay.sinks:
            keys.append(self.sink_k[: lay.sinks, layer].float())
            values.append(self.sink_v[: lay.sinks, layer].float())
            masks.append(torch.arange(lay.sinks) < step.input_pos)
        if lay.window:
            keys.append(self.win_k[: lay.window, layer].float())
            values.append(self.win_v[: lay.window, layer].float())
            masks.append(self.win_pos[: lay.window] >= 0)
        n16 = step.n_fill[3]
        if n16:
            keys.append(pool_rows(self.pool16_k, lay.n_layers, layer, n16).float())
            values.append(pool_rows(self.pool16_v, lay.n_layers, layer, n16).float())
            masks.append(torch.arange(n16) < self.fill[3])
        for i, bits in enumerate(QUANT_BITS):
            n = step.n_fill[i]
            if not n:
                continue
            pool = QuantPool(*(pool_rows(buf, lay.n_layers, layer, n) for buf in self.quant_pool(bits)))  # [n, H, ..]
            if self.fused_ops:
                parts.append(self._pool_attention(rows, *pool, self.fill[i : i + 1], bits, lay.group, scale))
                continue
            keys.append(quant.dequantize_packed(pool.k, pool.ks, pool.kz, bits, lay.group))
            values.append(quant.dequantize_packed(pool.v, pool.vs, pool.vz, lay.side(bits, 1)[0], lay.group))
            masks.append(torch.arange(n) < self.fill[i])
        if keys:
            o, m, l, p = attention.partial_attention(rows, torch.cat(keys), torch.cat(values), torch.cat(masks), scale)
            parts.append((o, m, l))
            if lay.window:
                win_part = (p[..., lay.sinks : lay.sinks + lay.window], m)
        # the chunk itself, causal, per batch row
        rep = hq // k.shape[1]
        kh, vh = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        s = torch.where(causal, q @ kh.transpose(-1, -2) * scale, torch.full((), attention.NEG))
        cm = s.amax(dim=-1)
        cp = torch.exp(s - cm.unsqueeze(-1)) * causal
        fold = lambda x: x.transpose(0, 1).reshape(hq, b * t, *x.shape[3:])  # noqa: E731
        parts.append((fold(cp @ vh), fold(cm), fold(cp.sum(-1))))
        out, lse = attention.merge_partials(parts)
        if layer == lay.n_layers - 1 and b == 1:
            step.received = (win_part if lay.window else None, (cp[0], cm[0]), lse)
        return self._rotate(out.reshape(hq, b, t, d).transpose(0, 1), lay.rotate_values)  # H @ H = I

    def _layer_attention(self, step: CacheStep, layer: int, q, k, v, rope: tuple) -> torch.Tensor:
        """``kvexport::layer_attention`` for batch 1: the projection's q ``[1, T, Hq·D]``, k/v ``[1, T, H·D]`` and
        ``rope``'s cos, sin ``[T, D]`` -> ``[1, T, Hq·D]``; keeps the last layer's features ``recv [W + T, 3]`` in
        ``step.received``."""
        from kvexport import ops
        from kvexport.kv.layer_attention import POOL_NAMES, WRITTEN_PARTS

        features = layer == self.layout.n_layers - 1 and self.policy.needs_features
        scale = 1.0 / math.sqrt(self.layout.head_dim)
        cos, sin = rope
        res = ops.layer_attention(q, k, v, cos, sin, step.kernel_state,
                                  [getattr(self, n) for n in WRITTEN_PARTS], [getattr(self, n) for n in POOL_NAMES],
                                  layer, self.layout.group, scale, features, self.layout.rotation,
                                  onnx=self.onnx_kernel)
        out, recv = res[:2]
        if self.onnx_kernel:
            step.staged_k.append(res[2])
            step.staged_v.append(res[3])
        if features:
            step.received = recv
        return out

    def _attention_features(self, received: tuple, n_tokens: int):
        """Attention received in the last layer from this step's queries (``CacheStep.received``),
        normalised so that uniform attention over the visible keys is 1. Returns (window sums
        ``[W, 3]``, chunk sums ``[T, 3]``) with columns (sum of head-mean, sum of head-variance,
        number of observing queries)."""
        lay = self.layout
        win_part, (cp, cm), lse = received  # cp [Hq, T, T], lse [Hq, T]
        n_cache = schedule.fp_resident(self.n_seen, lay.sinks, lay.window) + self.fill.sum()
        n_keys = (n_cache + torch.arange(1, n_tokens + 1)).float()  # visible keys per query row
        chunk_w = cp * torch.exp(cm - lse).unsqueeze(-1) * n_keys.view(1, -1, 1)
        later = torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril(-1)  # query row > key column
        chunk_sums = torch.stack(
            [
                (chunk_w.mean(0) * later).sum(0),
                (chunk_w.var(0, unbiased=False) * later).sum(0),
                later.sum(0).float(),
            ],
            dim=-1,
        )
        if win_part is None:
            return None, chunk_sums
        wp, wm = win_part
        win_w = wp * torch.exp(wm - lse).unsqueeze(-1) * n_keys.view(1, -1, 1)
        valid = (self.win_pos[: lay.window] >= 0).float()
        win_sums = torch.stack(
            [win_w.mean(0).sum(0), win_w.var(0, unbiased=False).sum(0), torch.ones_like(valid) * n_tokens], dim=-1
        ) * valid.unsqueeze(-1)
        return win_sums, chunk_sums

    @staticmethod
    def policy_inputs(feat_state: torch.Tensor) -> torch.Tensor:
        """Feature state ``[N, 6]`` -> policy features ``[N, 5]`` (attention sums become means)."""
        n = feat_state[:, 5:6].clamp(min=1.0)
        return torch.cat([feat_state[:, :3], feat_state[:, 3:5] / n], dim=-1)

    def _allocate(self, desired: torch.Tensor, valid: torch.Tensor):
        """The overflow rule (:mod:`kvexport.kv.allocate`): ``kvexport::allocate`` with the layer kernel (an
        ExecuTorch kernel, or an op of our ONNX Runtime library), else its reference. desired/valid ``[N]`` ->
        (class ``[N]``, slot ``[N]``, new fill ``[4]``)."""
        if self.layer_kernel:
            from kvexport import ops

            return ops.allocate(desired, valid, self.fill, self.caps)
        return allocate(desired, valid, self.fill, self.caps)

    def commit(self, step: CacheStep, tokens: torch.Tensor, logits: torch.Tensor | None) -> None:
        """Write the chunk of ``step`` into the cache (batch 1). tokens ``[1, T]``, logits ``[1, T, V]``
        (read only when the policy needs features; ``None`` otherwise)."""
        lay = self.layout
        S, W, fp = lay.sinks, lay.window, lay.torch_fp_dtype
        t = tokens.shape[1]
        pos = step.input_pos + torch.arange(t)
        if not self.layer_kernel:
            new_k = torch.stack([k[0].transpose(0, 1) for k in step.new_k], dim=1)  # [T, L, H, D]
            new_v = torch.stack([v[0].transpose(0, 1) for v in step.new_v], dim=1)

        if self.policy.needs_features:
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            maxp = logp.amax(-1).exp()
            if self.layer_kernel:
                win_sums, chunk_sums = step.received[:W], step.received[W:]
            else:
                win_sums, chunk_sums = self._attention_features(step.received, t)
            new_feat = torch.cat([torch.stack([self.rarity[tokens[0]], entropy, maxp], -1), chunk_sums], -1)
            if W:
                self.win_feat[:W, 3:] += win_sums
        else:
            new_feat = torch.zeros(t, N_FEAT_STATE)

        # 1. evict the tokens leaving the window into the pools
        in_win = pos >= S
        if W:
            ring = schedule.ring_slot(pos, S, W)
            cand_pos, cand_feat = self.win_pos[ring], self.win_feat[ring]
            if not self.layer_kernel:
                cand_k, cand_v = self.win_k[ring].float(), self.win_v[ring].float()
        else:
            cand_pos, cand_feat = torch.where(in_win, pos, -1), new_feat
            if not self.layer_kernel:
                cand_k, cand_v = new_k, new_v
        if self.onnx_kernel:  # the kernel staged the rows leaving the window (W == 0: the chunk itself)
            cand_k, cand_v = torch.stack(step.staged_k, 1).float(), torch.stack(step.staged_v, 1).float()
        elif self.layer_kernel:
            cand_k, cand_v = self.evict_k[:t].float(), self.evict_v[:t].float()
        valid = cand_pos >= S
        desired = self.policy(self.policy_inputs(cand_feat), cand_pos)
        cls, slot, new_fill = self._allocate(desired, valid)
        for i, c in enumerate(CLASSES):
            cap = lay.capacities[i]
            if cap == 0:
                continue
            idx = torch.where(cls == i, slot, cap)
            self._write(getattr(self, f"pool_pos{c}"), idx, cand_pos)
            rows = pool_index(idx, getattr(self, f"layer_base{c}"))  # [T·L]: slot idx[j] of every layer
            if c == 16:
                self._write(self.pool16_k, rows, cand_k.to(fp).flatten(0, 1))
                self._write(self.pool16_v, rows, cand_v.to(fp).flatten(0, 1))
                continue
            (kb, k_clip), (vb, v_clip) = lay.side(c, 0), lay.side(c, 1)
            packed = (*self.quantize_pack(cand_k, kb, lay.group, k_clip),
                      *self.quantize_pack(cand_v, vb, lay.group, v_clip))
            for buf, x in zip(self.quant_pool(c), packed):  # QuantPool order: k, ks, kz, v, vs, vz; x [T, L, H, ..]
                self._write(buf, rows, x.flatten(0, 1))
        self.fill.copy_(new_fill)

        # 2. the chunk enters the window ring (or the sinks)
        if W:
            if not self.layer_kernel:  # the kernel wrote the chunk's K/V already
                self._write(self.win_k, ring, new_k.to(fp))
                self._write(self.win_v, ring, new_v.to(fp))
            self._write(self.win_pos, ring, torch.where(in_win, pos, -1))
            self._write(self.win_feat, ring, new_feat)
        if S and not self.layer_kernel:
            sink_slot = torch.where(in_win, S, pos)
            self._write(self.sink_k, sink_slot, new_k.to(fp))
            self._write(self.sink_v, sink_slot, new_v.to(fp))
        self.n_seen.copy_((step.input_pos + t).reshape(1))

    @staticmethod
    def _write(buf: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """In-place ``buf[slots] = values`` as a 1-D ``index_put_``: the one scatter every backend
        runs in place (ExecuTorch's portable kernels have no ``index_copy``)."""
        buf.index_put_((slots,), values)

    def quantize_pack(self, x: torch.Tensor, bits: int, group: int, clip: float):
        """``kvexport::quantize_pack`` when fused, else its reference :func:`quant.quantize_packed`."""
        if self.fused_ops:
            from kvexport import ops

            return ops.quantize_pack(x, bits, group, clip)
        return quant.quantize_packed(x, bits, group, clip)

    @staticmethod
    def _pool_attention(*args):
        """``kvexport::pool_attention`` (fused mode); its reference is :func:`attention.pool_attention`."""
        from kvexport import ops

        return ops.pool_attention(*args)
