"""Group-wise asymmetric quantization of KV vectors, bit packing, and the Hadamard rotation.

Everything here is written in core ATen ops only (no ``<<``/``>>``, no data-dependent shapes), so
the same functions serve as the eager reference, the "portable" export path, and the spec that the
custom kernels in ``kvexport.ops`` must reproduce bit for bit.

Conventions (all functions):
  * ``x`` is float32 ``[..., D]``; the last dim is split into ``D // group`` groups of ``group``.
  * codes are uint8 values in ``[0, 2**bits - 1]``; ``x ~= code * scale + zero``.
  * ``scale`` and ``zero`` are float16 ``[..., D // group]``. ``zero`` is an fp16 value at or just
    below the group minimum, ``scale`` an fp16 value at or just above ``(max - zero) / qmax``, so
    every element lies inside the quantization grid and the dequantization error is at most half a
    step. Both are found without ``nextafter`` (ExecuTorch's portable kernels lack it): nudging
    ``y`` by ``|y| * 2**-10 + 2**-24`` (at least one fp16 ulp) before rounding to fp16 guarantees the
    direction. Arithmetic is float32, in exactly the order written (kernels must match bit for bit).
  * clipping (``clip`` in ``(0, 1]``, the fraction of each group's ``[min, max]`` range the grid
    spans, centred on the range): ``a = (1 - clip) / 2`` in fp32, ``shrink = (max - min) * a``, then
    ``min + shrink`` and ``max - shrink`` take the place of ``min`` and ``max`` (skipped when
    ``clip == 1``); elements outside the clipped range get the end codes. At 2 bits most of a
    key group's range is spent on one or two outliers: a clipped grid resolves the rest
    (``calibration/README.md``, "2-bit keys").
  * packing: ``8 // bits`` codes per byte, code ``i`` of a byte in bits ``[bits*i, bits*(i+1))``
    (little-endian within the byte); packed shape ``[..., D * bits // 8]``.
  * rotation (``--kv-rotate`` for queries and keys, ``--kv-rotate-values`` for values and, back, the attention
    output): ``x @ H`` with ``H = hadamard(D)`` the orthonormal, symmetric Sylvester-Hadamard matrix
    (``H @ H = I``), a MatMul in the cache and in export graphs. The layer kernel computes it as the fast
    Walsh-Hadamard transform (:func:`rotate`, its spec): for ``h = 1, 2, 4, ... < D``, every pair
    ``(j, j + h)`` with ``j mod 2h < h`` becomes ``(x_j + x_{j+h}, x_j - x_{j+h})``; then each element is
    multiplied by ``fp32(1 / sqrt(D))`` — additions in a fixed order, so kernel and reference agree bit
    for bit; against the MatMul, up to fp32 rounding.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

SUPPORTED_BITS = (2, 4, 8)
FP16_NUDGE = 2.0**-10  # relative nudge: >= one fp16 ulp of the value
FP16_TINY = 2.0**-24  # absolute nudge: one fp16 subnormal step
NO_CLIP = ((1.0,) * len(SUPPORTED_BITS),) * 2  # (key, value) clip ratios per class: none
EQUAL_VALUE_BITS = SUPPORTED_BITS  # value bits of the 2-, 4-, 8-bit(-key) classes: keys and values alike
ROTATE_KEYS, ROTATE_VALUES = 1, 2  # bits of a rotation mask (the layer kernel's kRotateKeys / kRotateValues)


def check_layout(head_dim: int, bits: int, group: int) -> None:
    """Raise ``ValueError`` when ``head_dim`` cannot be split into ``group``s or packed at ``bits``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits}; choose one of {SUPPORTED_BITS}")
    if group <= 0 or head_dim % group:
        raise ValueError(f"group size {group} does not divide head_dim {head_dim}")
    if (head_dim * bits) % 8:
        raise ValueError(f"head_dim {head_dim} at {bits} bits does not fill whole bytes")


def packed_bits(packed: torch.Tensor, head_dim: int) -> int:
    """Bits per code of packed rows ``[..., head_dim*bits/8]``: what every reader of a pool takes its sides'
    bits from (keys and values of a class may differ: ``--kv-classes``)."""
    return packed.shape[-1] * 8 // head_dim


def bits_per_element(bits: int, group: int) -> float:
    """Storage cost in bits per element including the fp16 scale and zero of each group."""
    if bits >= 16:
        return float(bits)
    return bits + 2 * 16 / group


def check_clip(clip: float) -> None:
    """Raise ``ValueError`` unless ``0 < clip <= 1``."""
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio {clip} is outside (0, 1]")


def parse_clip(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A ``--kv-clip`` spec -> (key clip, value clip), one ratio per bit-width of :data:`SUPPORTED_BITS`.

    ``none`` clips nothing; otherwise comma-separated ``k<bits>=<ratio>`` / ``v<bits>=<ratio>``
    entries (e.g. ``k2=0.7,v2=0.9``); classes not named keep their whole range (ratio 1).
    """
    ratios = {side: [1.0] * len(SUPPORTED_BITS) for side in "kv"}
    if spec.strip() != "none":
        for entry in spec.split(","):
            name, _, value = entry.strip().partition("=")
            side, bits = name[:1], name[1:]
            if side not in ratios or not bits.isdigit() or int(bits) not in SUPPORTED_BITS:
                raise ValueError(f"bad --kv-clip entry '{entry}': use k<bits>=<ratio> or v<bits>=<ratio> with bits "
                                 f"in {SUPPORTED_BITS}, e.g. k2=0.7, or 'none'")
            try:
                ratio = float(value)
            except ValueError:
                raise ValueError(f"bad --kv-clip ratio in '{entry}': expected a number in (0, 1]") from None
            check_clip(ratio)
            ratios[side][SUPPORTED_BITS.index(int(bits))] = ratio
    return tuple(ratios["k"]), tuple(ratios["v"])


def parse_classes(spec: str) -> tuple[int, ...]:
    """A ``--kv-classes`` spec -> the value bits of the classes whose keys are stored at 2, 4 and 8 bits.

    Comma-separated ``k<bits>v<bits>`` entries (e.g. ``k4v2,k8v4``: 4-bit keys with 2-bit values, 8-bit keys
    with 4-bit values); a class not named keeps its values at its key bits (``k2v2,k4v4,k8v8``: the
    default). Values may not be finer than their keys (the 2-bit loss is the keys': calibration/README.md),
    which also keeps the classes ordered by cost.
    """
    vbits = list(EQUAL_VALUE_BITS)
    for entry in spec.split(","):
        m = re.fullmatch(r"k(\d+)v(\d+)", entry.strip())
        kb, vb = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        if kb not in SUPPORTED_BITS or vb not in SUPPORTED_BITS or vb > kb:
            raise ValueError(f"bad --kv-classes entry '{entry}': use k<key bits>v<value bits> with bits in "
                             f"{SUPPORTED_BITS} and values no finer than keys, e.g. k4v2,k8v4")
        vbits[SUPPORTED_BITS.index(kb)] = vb
    return tuple(vbits)


def classes_spec(value_bits: tuple[int, ...]) -> str:
    """The canonical ``--kv-classes`` spec of ``value_bits`` (every class named, e.g. ``k2v2,k4v2,k8v8``)."""
    return ",".join(f"k{kb}v{vb}" for kb, vb in zip(SUPPORTED_BITS, value_bits))


def clip_shrink(clip: float) -> float:
    """``a = (1 - fp32(clip)) / 2``, computed in fp32 as every backend does."""
    return float((np.float32(1.0) - np.float32(clip)) / np.float32(2.0))


def quantize(x: torch.Tensor, bits: int, group: int,
             clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize float32 ``x [..., D]`` to (codes uint8 ``[..., D]``, scale fp16, zero fp16 ``[..., D/group]``)."""
    qmax = 2**bits - 1
    shape = x.shape
    xg = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    a = clip_shrink(clip)
    if a != 0.0:
        shrink = (hi - lo) * a
        lo, hi = lo + shrink, hi - shrink
    zero = (lo - (lo.abs() * FP16_NUDGE + FP16_TINY)).to(torch.float16)
    span = (hi - zero.float()) / qmax
    scale = (span + (span * FP16_NUDGE + FP16_TINY)).to(torch.float16)
    codes = torch.round((xg - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, qmax)
    return codes.to(torch.uint8).reshape(shape), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: uint8 codes ``[..., D]`` -> float32 ``[..., D]``."""
    shape = codes.shape
    cg = codes.reshape(*shape[:-1], shape[-1] // group, group).float()
    x = cg * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.reshape(shape)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` (values < 2**bits) into uint8 ``[..., D * bits // 8]``."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    lanes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = lanes[..., 0]
    for i in range(1, per_byte):
        packed = packed + lanes[..., i] * (1 << (bits * i))
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 ``[..., P]`` into codes uint8 ``[..., P * 8 // bits]``."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    lanes = [
        torch.bitwise_and(torch.div(packed, 1 << (bits * i), rounding_mode="floor"), mask) for i in range(per_byte)
    ]
    codes = torch.stack(lanes, dim=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def quantize_packed(x: torch.Tensor, bits: int, group: int,
                    clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize` then :func:`pack`: float32 ``[..., D]`` -> (packed uint8, scale fp16, zero fp16)."""
    codes, scale, zero = quantize(x, bits, group, clip)
    return pack(codes, bits), scale, zero


def dequantize_packed(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int
) -> torch.Tensor:
    """:func:`unpack` then :func:`dequantize`: packed uint8 -> float32 ``[..., D]``."""
    return dequantize(unpack(packed, bits), scale, zero, group)


def check_rotation(dim: int) -> None:
    """Raise ``ValueError`` unless ``dim`` (the head_dim) is a power of two."""
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"--kv-rotate needs a power-of-two head_dim, got {dim}; pass --no-kv-rotate")


def rotation_mask(keys: bool, values: bool) -> int:
    """The rotation mask of ``--kv-rotate`` / ``--kv-rotate-values``: :data:`ROTATE_KEYS` rotates queries and keys,
    :data:`ROTATE_VALUES` values and, back, the attention output."""
    return ROTATE_KEYS * bool(keys) | ROTATE_VALUES * bool(values)


def rotation_scale(dim: int) -> float:
    """``fp32(1 / sqrt(dim))``, the last multiply of :func:`rotate` (the kernels round the same double)."""
    return float(np.float32(1.0 / math.sqrt(dim)))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., D]`` -> ``x @ hadamard(D)`` by the fast Walsh-Hadamard transform (the module
    docstring's order, which ``kvexport::layer_attention`` reproduces bit for bit)."""
    d = x.shape[-1]
    check_rotation(d)
    lead = x.shape[:-1]
    h = 1
    while h < d:
        pairs = x.reshape(*lead, d // (2 * h), 2, h)  # [..., blocks, (j, j + h), h]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*lead, d)
        h *= 2
    return x * torch.tensor(rotation_scale(d), dtype=torch.float32)


def hadamard(dim: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix float32 ``[dim, dim]`` (``H @ H.T == I``); dim a power of 2."""
    check_rotation(dim)
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)
