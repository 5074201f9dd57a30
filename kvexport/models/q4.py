"""``q4`` weights: the GGUF's Q4_1 codes, exactly, as an XNNPACK 8da4w linear plus a block-sum linear.

Q4_1 (every block linear of the default model's GGUF): per block of :data:`BLOCK` = 32 input
channels of one output row, ``w = d·q + m`` with fp16 ``d``, ``m`` and codes ``q`` in 0..15.
XNNPACK's blockwise 4-bit GEMM has one zero point per tensor (8) and bf16 block scales, so it cannot
hold ``m`` — but ``w = d·(q − 8) + (m + 8d)``, hence for ``x`` ``[..., in]`` and its int8 form ``x̃``::

    y = linear_8da4w(x; codes q − 8, scales bf16(d))      # [..., out]: d·(q − 8) · x̃
      + blocksum_8da4w(x) @ cᵀ                            # [..., in/32] @ [in/32, out], c = m + 8d

Both 8da4w terms are torchao's ``IntxUnpackedToInt8Tensor`` with per-token asymmetric int8 activations
(the form ExecuTorch's XNNPACK partitioner lowers to its 8da4w GEMM), so both read the same ``x̃``: the
block sums are a 4-bit linear whose codes are a 0/1 block indicator with scales 1 (:func:`block_sum_weight`,
one per width, shared), and the offsets a small fp32 linear. So the program applies the GGUF's weights
(bf16 ``d``) to ``x̃`` exactly — llama.cpp's own Q4_1 x Q8_1 dot product also takes the block minimum
times the sum of the *quantized* input. Measured on the default model (WikiText-2 test, first 4,096
tokens, 512-token windows, fp16 KV, eager, ``q4``): block sums of ``x̃`` 30.647, of the float ``x``
(until this change) 30.946; fp32 weights 30.357. (The float sums left ``d·(q − 8)·(x̃ − x)`` as the
activation error, whose weights are larger than ``w``'s wherever ``c`` offsets them.) Every op stays in
one XNNPACK partition (a ``sum`` op would run outside it, once per linear). The only departures from the
GGUF's arithmetic are the bf16 rounding of ``d`` and the int8 activations; the eager reference (this
module) computes what the program computes (up to float32 summation order), so ``kvexport parity``
compares like with like.

Codes are recovered from the loaded float weights (the GGUF converter dequantized them with
``d·q + m`` in fp32): in a Q4_1 block the min is ``m`` (code 0) and the max ``m + 15d`` (code 15),
so ``d = fp16((max − min)/15)``, ``q = round((w − m)/d)``. A weight counts as **exact** when
``d·q + m`` reproduces every element bit for bit (every block linear of the default model does).
Weights that do not (a safetensors model) get the same min/max rule as a **re-quantization**
(llama.cpp's Q4_1 quantizer: asymmetric, 4-bit, block 32) and the manifest says which happened.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32


def q4_1_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``w`` float ``[out, in]`` -> codes uint8 ``[out, in]`` (0..15), ``d``, ``m`` float32
    ``[out, in/32]`` (fp16-representable) and whether ``d·q + m`` reproduces ``w`` bit for bit."""
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // BLOCK, BLOCK)  # [out, nb, 32]
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # [out, nb]
    m = lo.half().float()
    d = ((hi - lo) / 15).half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((blocks - m[..., None]) / safe[..., None]).clamp(0, 15)  # [out, nb, 32]
    exact = torch.equal(d[..., None] * q + m[..., None], blocks)
    return q.to(torch.uint8).reshape(out_f, in_f), d, m, exact


def block_ones(in_features: int) -> torch.Tensor:
    """``[in/32, in]`` block indicator: ``F.linear(x, block_ones(in))`` sums each block of 32 inputs."""
    return torch.eye(in_features // BLOCK).repeat_interleave(BLOCK, dim=1)


def quantize_q8_0_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``x`` float32 ``[..., K]`` -> int8 codes ``[..., K]`` and fp32 scales ``[..., K/32]``, per
    block of 32: ``sx = amax/127``, ``xq = round_half_even(x/sx)`` (llama.cpp's Q8_0 activations, scale kept
    in fp32; ONNX Runtime's ``MatMulNBits`` at accuracy level 4 quantizes its input the same way); an all-zero
    block gets ``sx = 0`` and zero codes."""
    xb = x.float().unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))  # [..., nb, 32]
    sx = xb.abs().amax(-1) / 127  # [..., nb]
    safe = torch.where(sx > 0, sx, torch.ones_like(sx))
    xq = torch.round(xb / safe[..., None]).clamp(-127, 127)
    return xq.to(torch.int8).flatten(-2), sx


def block_int8_linear(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x`` float32 ``[..., K]``, integer ``codes`` held in float32 ``[N, K/32, 32]``, scales ``d`` ``[N, K/32]``
    -> float32 ``[..., N]``: ``sum_b (d_b·sx_b)·(codes_b · xq_b)`` with the activations quantized by
    :func:`quantize_q8_0_rows` and exact integer block sums (``|sum| <= 32·127·255 < 2**24``)."""
    n, nb, _ = codes.shape
    xq, sx = quantize_q8_0_rows(x)
    xb = xq.float().unflatten(-1, (nb, BLOCK))  # [..., nb, 32]
    out = torch.zeros(*x.shape[:-1], n)
    for b in range(nb):
        out += (xb[..., b, :] @ codes[:, b, :].T) * (d[:, b] * sx[..., b, None])  # [..., N]
    return out


def onnx_zero_points(d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer zero points ``z = clamp(round(−m/d), 0, 15)`` and block offsets ``m + z·d`` (float32, both
    ``[out, in/32]``) of the ONNX form ``w = d·(q − z) + (m + z·d)`` (:mod:`kvexport.export.onnx_q4`): ``z``
    nearest to ``−m/d`` keeps the offset within ``d/2``, so the two products do not cancel."""
    z = torch.round(-m.double() / d.double()).clamp(0, 15)
    return z.float(), (m.double() + z * d.double()).float()


class Q4Int8Linear(nn.Module):
    """ONNX Runtime's form of Q4_1 weights: ``MatMulNBits`` at accuracy level 4 on codes ``q − z`` with the input
    quantized per block of 32 (:func:`block_int8_linear`: llama.cpp's Q4_1 x Q8 arithmetic), plus the fp32
    block-offset product ``blocksum(x) @ (m + z·d)ᵀ`` (:func:`onnx_zero_points`). The reference of the
    onnx / ort ``q4`` programs."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        codes, d, m, self.exact = q4_1_codes(w)
        out_f, in_f = codes.shape
        z, offsets = onnx_zero_points(d, m)
        self.register_buffer("codes", codes.float().reshape(out_f, in_f // BLOCK, BLOCK) - z[..., None])
        self.register_buffer("d", d)  # [out, in/32]
        self.register_buffer("offsets", offsets)  # [out, in/32]
        self.register_buffer("block_ones", block_ones(in_f), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = F.linear(x.float(), self.block_ones)  # [..., in/32]
        return block_int8_linear(x, self.codes, self.d) + F.linear(sums, self.offsets)  # [..., out]


def holds_q4_1_codes(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether every block linear (``[model.]layers.*_proj.weight``) reproduces Q4_1 codes bit for bit, as the
    weights of a Q4_1 GGUF do: then the ``q4`` formats lose nothing but bf16 scale rounding, and
    ``kvexport build`` picks them by default. Stops at the first linear that does not."""
    names = [k for k in state_dict if k.removeprefix("model.").startswith("layers.") and k.endswith("_proj.weight")]
    return bool(names) and all(state_dict[k].shape[1] % BLOCK == 0 and q4_1_codes(state_dict[k])[3] for k in names)


def dequantize_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The direct form ``w = d·q + m`` (float32 ``[out, in]``), the rewrite's ground truth."""
    out_f, in_f = codes.shape
    q = codes.float().reshape(out_f, in_f // BLOCK, BLOCK)
    return (d[..., None] * q + m[..., None]).reshape(out_f, in_f)


def int4_weight(qdata: torch.Tensor, scale: torch.Tensor) -> nn.Parameter:
    """int8 codes ``[out, in]`` in -8..7 and block scales ``[out, in/32]`` -> a frozen 8da4w weight (per-token
    asymmetric int8 activations; scales kept in bf16, as XNNPACK's blockwise 4-bit GEMM keeps them)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    return nn.Parameter(IntxUnpackedToInt8Tensor(
        qdata=qdata, scale=scale.to(torch.bfloat16), zero_point=torch.zeros(scale.shape, dtype=torch.int8),
        target_dtype=torch.int4, block_size=(1, BLOCK), dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN),
        requires_grad=False)


def block_sum_weight(in_features: int) -> nn.Parameter:
    """The 8da4w linear ``[in/32, in]`` whose outputs are the block sums of the int8 input: codes 1 inside
    block b's 32 columns, 0 elsewhere, scales 1 (:func:`quantize_q4` shares one per width, so the program
    stores it once)."""
    nb = in_features // BLOCK
    return int4_weight(block_ones(in_features).to(torch.int8), torch.ones(nb, nb))


class Q4Linear(nn.Module):
    """A bias-free linear with Q4_1 weights in the rewritten form (module docstring)."""

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, exact: bool,
                 block_sums: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.exact = exact  # codes recovered bit-exactly (True) or re-quantized (False)
        self.weight = int4_weight((codes.to(torch.int16) - 8).to(torch.int8), d)  # [out, in] in -8..7
        self.offsets = nn.Parameter(m + 8 * d, requires_grad=False)  # [out, in/32]: c = m + 8d
        # [in/32, in], shared when given
        self.block_sums = block_sum_weight(self.in_features) if block_sums is None else block_sums

    @classmethod
    def from_float(cls, w: torch.Tensor, block_sums: nn.Parameter | None = None) -> "Q4Linear":
        return cls(*q4_1_codes(w), block_sums)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = F.linear(x, self.block_sums)  # [..., in/32]: of the int8 input the first term reads
        return F.linear(x, self.weight) + F.linear(sums, self.offsets)  # [..., out]


def quantize_q4(model: nn.Module) -> dict:
    """Replace every block ``nn.Linear`` of ``model`` whose width is a multiple of 32 by a
    :class:`Q4Linear`, in place. Returns the manifest's summary: how many were exact, how many
    re-quantized."""
    sums = {}  # width -> its block_sum_weight, one per width
    for fqn, mod in _block_linears(model):
        parent, _, name = fqn.rpartition(".")
        shared = sums.setdefault(mod.in_features, block_sum_weight(mod.in_features))
        setattr(model.get_submodule(parent), name, Q4Linear.from_float(mod.weight.detach(), shared))
    return q4_summary(model)


def quantize_q4_int8(model: nn.Module) -> None:
    """Replace the same linears as :func:`quantize_q4` by :class:`Q4Int8Linear` (ONNX Runtime's arithmetic)."""
    for fqn, mod in _block_linears(model):
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent), name, Q4Int8Linear(mod.weight.detach()))


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(fqn, mod) for fqn, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and fqn.startswith("layers.") and mod.bias is None
            and mod.in_features % BLOCK == 0]


def q4_summary(model: nn.Module) -> dict:
    """How many block linears are :class:`Q4Linear`, how many exact, and the codes' ``source``."""
    layers = [m for fqn, m in model.named_modules() if isinstance(m, Q4Linear) and fqn.startswith("layers.")]
    exact = sum(m.exact for m in layers)
    source = ("gguf-q4_1-codes" if exact == len(layers) else
              "requantized-q4_1-minmax" if exact == 0 else "mixed")
    return {"linears": len(layers), "exact": exact, "requantized": len(layers) - exact, "block": BLOCK,
            "source": source}
