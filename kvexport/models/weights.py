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

The quantized reference (eager torchao) is what ``kvexport parity`` compares a quantized program
with and what ``kvexport eval --weights`` measures perplexity with.
"""

from __future__ import annotations

import torch
from torch import nn

TORCHAO_FORMATS = ("fp32", "8da8w", "8da4w", "q4", "q4-h8", "q4-h4", "q4-q8")
Q4_HEADS = {"q4-h8": "8da8w", "q4-h4": "q4", "q4-q8": "q8_0"}  # q4 format -> lm_head format (kvexport.models.tied)
INT4_GROUP = 32


def quantize_weights(model: nn.Module, weights: str) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` (a :class:`~kvexport.models.llama.Transformer`) in
    place to ``weights``; returns the model. The KV controller is not part of ``model``."""
    if weights == "fp32":
        return model
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


def q4_manifest(model: nn.Module, weights: str) -> dict:
    """The manifest's ``q4`` entry of a model quantized to a ``q4*`` format: where the linears' codes
    came from, and the formats of the tied embedding and ``lm_head``."""
    from kvexport.models.q4 import q4_summary

    embed = getattr(model.embed_tokens, "exact", None)  # only a Q8Embedding has codes
    return {**q4_summary(model),
            "embedding": "fp32" if embed is None else "q8_0-codes" if embed else "requantized-q8_0",
            "lm_head": Q4_HEADS.get(weights, "fp32 (tied to the embedding)")}
