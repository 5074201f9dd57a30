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
  * packing: ``8 // bits`` codes per byte, code ``i`` of a byte in bits ``[bits*i, bits*(i+1))``
    (little-endian within the byte); packed shape ``[..., D * bits // 8]``.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 4, 8)
FP16_NUDGE = 2.0**-10  # relative nudge: >= one fp16 ulp of the value
FP16_TINY = 2.0**-24  # absolute nudge: one fp16 subnormal step


def check_layout(head_dim: int, bits: int, group: int) -> None:
    """Raise ``ValueError`` when ``head_dim`` cannot be split into ``group``s or packed at ``bits``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits}; choose one of {SUPPORTED_BITS}")
    if group <= 0 or head_dim % group:
        raise ValueError(f"group size {group} does not divide head_dim {head_dim}")
    if (head_dim * bits) % 8:
        raise ValueError(f"head_dim {head_dim} at {bits} bits does not fill whole bytes")


def bits_per_element(bits: int, group: int) -> float:
    """Storage cost in bits per element including the fp16 scale and zero of each group."""
    if bits >= 16:
        return float(bits)
    return bits + 2 * 16 / group


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize float32 ``x [..., D]`` to (codes uint8 ``[..., D]``, scale fp16, zero fp16 ``[..., D/group]``)."""
    qmax = 2**bits - 1
    shape = x.shape
    xg = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
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


def quantize_packed(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize` then :func:`pack`: float32 ``[..., D]`` -> (packed uint8, scale fp16, zero fp16)."""
    codes, scale, zero = quantize(x, bits, group)
    return pack(codes, bits), scale, zero


def dequantize_packed(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int
) -> torch.Tensor:
    """:func:`unpack` then :func:`dequantize`: packed uint8 -> float32 ``[..., D]``."""
    return dequantize(unpack(packed, bits), scale, zero, group)


def hadamard(dim: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix float32 ``[dim, dim]`` (``H @ H.T == I``); dim a power of 2."""
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)
