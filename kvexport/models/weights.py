"""Weight formats of the linear layers, shared by the ExecuTorch build and the reference model.

``fp32``: as loaded. ``8da8w`` / ``8da4w``: torchao's 8-bit dynamic (per-token, asymmetric)
activation quantization with symmetric int8 / int4 weights (``Int8DynamicActivationIntxWeightConfig``),
the form ExecuTorch's XNNPACK partitioner lowers to its quantized GEMMs, on every linear layer of
the blocks. int8 weights are per output channel; int4 weights per group of :data:`INT4_GROUP` input
channels (SmolLM's width 576 is not a multiple of 128, ExecuTorch's default, so 32: the GGUF's own
Q4_1 block size). The ``lm_head`` stays fp32: measured on the default model (WikiText-2 test, first
4,096 tokens, fp16 KV), 8-bit everywhere costs +2.05% perplexity (30.98 vs 30.36), 8-bit except
the ``lm_head`` +1.28% (30.75), 8-bit except ``down_proj`` +2.09%. ``q4``: the GGUF's own Q4_1
codes, exactly, as an 8da4w linear plus a block-sum linear (:mod:`kvexport.models.q4`; a
re-quantization with the same Q4_1 rule for weights that do not come from Q4_1), the tied table
fp32. ``q4-h8`` / ``q4-h4``: the same, plus the tied table compact (:mod:`kvexport.models.tied`):
the embedding lookup on its exact Q8_0 codes, the ``lm_head`` int8 per channel (8da8w) / 4-bit.
``q4-q8``: the GGUF's codes everywhere — Q4_1 linears as in ``q4``, and the ``lm_head`` reading the
lookup's Q8_0 table (stored once) through ``kvexport::q8_linear``: exact, but only for programs that
carry our kernel library (``--ops fused``; a portable build of the same model uses ``q4-h8``).

The onnx/ort targets' ``int8`` / ``int4`` (``MatMulNBits``, symmetric, blocks of 32, at accuracy level 4: inputs
int8 per block of 32) have their reference here too (:func:`nbits_weights`: ONNX Runtime's own codes, in its
arithmetic). At accuracy level 0 (fp32 inputs) ONNX Runtime 1.32 has no fast 8-bit kernel: the default model's
``int8`` program decoded at 166 ms/token at 128 tokens against 12.5 at level 4.

The quantized reference (eager torchao) is what ``kvexport parity`` compares a quantized program
with and what ``kvexport eval --weights`` measures perplexity with.
"""

from __future__ import annotations

import torch
from torch import nn

from kvexport.models.formats import NBITS_BLOCK, NBITS_FORMATS, TORCHAO_FORMATS

Q4_HEADS = {"q4-h8": "8da8w", "q4-h4": "q4", "q4-q8": "q8_0"}  # q4 format -> lm_head format (kvexport.models.tied)
INT4_GROUP = 32


def quantize_weights(model: nn.Module, weights: str) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` (a :class:`~kvexport.models.llama.Transformer`) in
    place to ``weights`` (:data:`REFERENCE_FORMATS`: the ExecuTorch formats, and the onnx/ort ``int8`` /
    ``int4`` of :func:`nbits_weights`); returns the model. The KV controller is not part of ``model``."""
    if weights == "fp32":
        return model
    if weights in NBITS_FORMATS:
        return nbits_weights(model, weights)
    if weights not in TORCHAO_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}")
    if weights.startswith("q4"):
        from kvexport.models.q4 import quantize_q4
        from kvexport.models.tied import compact_embedding, compact_head

        quantize_q4(model)
        if weights in Q4_HEADS:
            compact_embedding(model)
            compact_head(model, Q4_HEADS[weights])
        return model
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    int4 = weights == "8da4w"
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4 if int4 else torch.int8,
        weight_granularity=PerGroup(INT4_GROUP) if int4 else PerAxis(0),
        # XNNPACK's blockwise 4-bit GEMM keeps the group scales in bf16; the reference must too.
        weight_scale_dtype=torch.bfloat16 if int4 else None,
    )

    def in_blocks(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and fqn.startswith("layers.")
                and (not int4 or module.in_features % INT4_GROUP == 0))

    quantize_(model, config, filter_fn=in_blocks)
    return model


def nbits_weights(model: nn.Module, weights: str) -> nn.Module:
    """The onnx/ort ``int8`` / ``int4`` weights in the reference, in place: every linear the ONNX weight quantizer
    rewrites (the block linears and the ``lm_head``, untied from the embedding, which stays a float ``Gather``)
    becomes an :class:`NBitsLinear` on ONNX Runtime's own block quantization (``quantize_matmul_{8,4}bits``, the
    routine its ``MatMulNBitsQuantizer`` calls: symmetric, blocks of :data:`NBITS_BLOCK` along the input), codes
    ``q − 2^(bits−1)``, computed as ``MatMulNBits`` at accuracy level 4 does. Returns the model."""
    import numpy as np
    from onnxruntime.capi import _pybind_state as ort_c

    bits = NBITS_FORMATS[weights]
    quantize = ort_c.quantize_matmul_8bits if bits == 8 else ort_c.quantize_matmul_4bits
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    for fqn, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) and (fqn.startswith("layers.") or fqn == "lm_head")):
            continue
        n, k = mod.weight.shape  # the ONNX MatMul's B is the [k, n] transpose: blocks run along k per column n
        nb = k // NBITS_BLOCK
        packed = np.zeros((n, nb, NBITS_BLOCK * bits // 8), dtype=np.uint8)
        scales = np.zeros((n, nb), dtype=np.float32)
        zero = np.zeros((n, -(-nb // (8 // bits))), dtype=np.uint8)
        quantize(packed, np.ascontiguousarray(mod.weight.detach().float().T.numpy()), scales, zero,
                 NBITS_BLOCK, n, k, True)
        codes = torch.from_numpy(packed).int()  # [n, nb, 32 * bits / 8]
        if bits == 4:  # two codes a byte, the first in the low nibble
            codes = torch.stack([codes & 15, codes >> 4], -1).flatten(-2)
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name,
                NBitsLinear(codes.float() - 2 ** (bits - 1), torch.from_numpy(scales)))
    return model


class NBitsLinear(nn.Module):
    """``MatMulNBits`` at accuracy level 4 on symmetric codes: ``w = scale·c``, ``c = q − 2^(bits−1)`` (float32
    ``[out, in/32, 32]``), scales float32 ``[out, in/32]``; the input quantized per block of 32 to int8 and exact
    integer block sums (:func:`kvexport.models.q4.block_int8_linear`, which ONNX Runtime's ``q4`` head matches to
    ~6e-7)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kvexport.models.q4 import block_int8_linear

        return block_int8_linear(x, self.codes, self.scales)  # [..., out]


def q4_manifest(model: nn.Module, weights: str) -> dict:
    """The manifest's ``q4`` entry of a model quantized to a ``q4*`` format: where the linears' codes
    came from, and the formats of the tied embedding and ``lm_head``."""
    from kvexport.models.q4 import q4_summary

    embed = getattr(model.embed_tokens, "exact", None)  # only a Q8Embedding has codes
    return {**q4_summary(model),
            "embedding": "fp32" if embed is None else "q8_0-codes" if embed else "requantized-q8_0",
            "lm_head": Q4_HEADS.get(weights, "fp32 (tied to the embedding)")}
