"""The tied embedding / lm_head of ``q4`` weights, compact: Q8_0 codes for the lookup, a choice for the head.

In the default model's GGUF the tied table (``token_embd``, ``[vocab, dim]``) is Q8_0: per block of
:data:`BLOCK` = 32, ``w = d·q`` with int8 ``q`` and fp16 ``d``. Recovered like the Q4_1 codes of
:mod:`kvexport.models.q4`: the block's largest magnitude is ``127·d`` (llama.cpp sets
``d = amax/127``), so ``d = fp16(amax/127)``, ``q = round(w/d)``; exact when ``d·q`` reproduces
every weight bit for bit, otherwise a re-quantization by the same rule.

* lookup: :class:`Q8Embedding` gathers the int8 rows and fp16 scales of the looked-up tokens and
  multiplies them in fp32, with core ATen ops only (no quantized-kernel library in the runtime):
  exact, 1.06 bytes per weight.
* head (``lm_head``, the largest linear: 28M weights) — :data:`HEADS`: ``fp32`` (a second, float
  copy), ``8da8w`` (int8 per output channel with dynamic int8 activations, a re-quantization of the
  8-bit values), ``q4`` (Q4_1 min/max re-quantization as a :class:`~kvexport.models.q4.Q4Linear`),
  ``q8_0`` (:class:`Q8Head`: the lookup's own codes and scales through ``kvexport::q8_linear`` with
  activations quantized per block of 32, llama.cpp's arithmetic for Q8_0 weights: the GGUF's weights
  exactly, and the table stored once; needs our kernel library, so fused ExecuTorch programs only).
  XNNPACK has no blockwise 8-bit GEMM, so only ``q8_0`` keeps Q8_0 exactly; measured on the default
  model in the module's README section.

:func:`q8_0_linear` is the reference of ``kvexport::q8_linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from kvexport.models.q4 import BLOCK, Q4Linear, block_int8_linear

HEADS = ("fp32", "8da8w", "q4", "q8_0")


def q8_0_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``w`` float ``[rows, cols]`` -> codes int8 ``[rows, cols]``, ``d`` float32 ``[rows, cols/32]``
    (fp16-representable) and whether ``d·q`` reproduces ``w`` bit for bit."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // BLOCK, BLOCK)  # [rows, nb, 32]
    d = (blocks.abs().amax(-1) / 127).half().float()  # [rows, nb]
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(blocks / safe[..., None]).clamp(-127, 127)
    exact = torch.equal(d[..., None] * q, blocks)
    return q.to(torch.int8).reshape(rows, cols), d, exact


def q8_0_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` float32 ``[..., K]``, codes int8 ``[N, K]``, fp16 scales ``[N, K/32]`` -> float32 ``[..., N]``: the
    Q8_0 x Q8_0 product llama.cpp computes for these weights (:func:`~kvexport.models.q4.block_int8_linear`)."""
    n, k = codes.shape
    return block_int8_linear(x, codes.float().reshape(n, k // BLOCK, BLOCK), scales.float())


class Q8Embedding(nn.Module):
    """Embedding lookup from Q8_0 codes: ``codes`` int8 ``[vocab, dim]``, ``scales`` fp16 ``[vocab, dim/32]``."""

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, exact: bool):
        super().__init__()
        self.exact = exact
        self.register_buffer("codes", codes)
        self.register_buffer("scales", d.half())  # d is fp16 in Q8_0: no rounding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)  # [B*T]
        rows = self.codes.index_select(0, flat).float()  # [B*T, dim]
        scales = self.scales.index_select(0, flat).float()  # [B*T, dim/32]
        x = rows.unflatten(-1, (scales.shape[-1], BLOCK)) * scales[..., None]  # [B*T, dim/32, 32]
        return x.reshape(*tokens.shape, -1)  # [B, T, dim]


class Q8Head(nn.Module):
    """The ``lm_head`` on the lookup's Q8_0 table: the same ``codes`` / ``scales`` buffers as the
    :class:`Q8Embedding` (one constant in the program), read by ``kvexport::q8_linear``."""

    def __init__(self, embedding: Q8Embedding):
        super().__init__()
        import kvexport.ops as ops

        ops.load()
        self.register_buffer("codes", embedding.codes)  # [vocab, dim] int8, shared with the lookup
        self.register_buffer("scales", embedding.scales)  # [vocab, dim/32] fp16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kvexport.q8_linear(x, self.codes, self.scales)  # [..., vocab]


def compact_embedding(model: nn.Module) -> bool:
    """Replace ``model.embed_tokens`` by a :class:`Q8Embedding` of its table (in place; an ``lm_head``
    that shared the table keeps it as a float copy). Returns whether the codes are exact."""
    table = model.embed_tokens.weight.detach()
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(table.clone(), requires_grad=False)
    model.embed_tokens = Q8Embedding(*q8_0_codes(table))
    return model.embed_tokens.exact


def compact_head(model: nn.Module, head: str) -> None:
    """Put ``model.lm_head`` (untied by :func:`compact_embedding`) into format ``head``, in place."""
    if head not in HEADS:
        raise ValueError(f"unknown lm_head format {head!r}")
    if head == "q8_0":
        model.lm_head = Q8Head(model.embed_tokens)
    elif head == "q4":
        model.lm_head = Q4Linear.from_float(model.lm_head.weight.detach())
    elif head == "8da8w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis

        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        quantize_(model, config, filter_fn=lambda module, fqn: fqn == "lm_head")
