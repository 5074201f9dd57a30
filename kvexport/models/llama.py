"""One readable Llama / SmolLM forward over a chunk of tokens against an explicit KV cache.

No framework cache classes: the caller owns a cache object (``kvexport.kv.cache.MixedKVCache``) and
passes it in. :meth:`Transformer.forward_step` starts a step (``step = cache.begin(input_pos)``),
each attention layer hands its queries and fresh keys/values (the projection's outputs, before RoPE) and
the step's RoPE tables to ``cache.attend(step, layer, q, k, v, rope)``, which returns the output projection's
input (:func:`rope_heads` and :func:`merge_heads` are the layout rule every cache follows), and the step
comes back with the logits: the caller may ``cache.commit(step, tokens, logits)`` the chunk into the cache
(decode/prefill) or not (scoring continuations over a fixed context; :meth:`Transformer.forward` returns the
logits only).

Every program and reference runs the **stacked** form (:meth:`Transformer.fuse_projections`, which
:meth:`~kvexport.models.loader.LoadedModel.build` applies): q/k/v one linear, gate/up one linear, so a block
has 4 linears instead of 7 (3 fewer GEMMs and, with quantized weights, 3 fewer activation quantizations per
block; each output row is the same dot product). Hugging Face's names are what weights load under.

Shapes: ``tokens`` int64 ``[B, T]``; ``input_pos`` int64 ``[1]`` (position of ``tokens[:, 0]``);
logits float32 ``[B, T, vocab]``. All compute is float32. :meth:`Transformer.hidden` takes explicit
positions (``[T]``, or ``[B, T]`` when every row has its own, as in the batched evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    """Llama hyper-parameters (SmolLM uses tied embeddings, no biases, SiLU-gated MLP)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    max_position: int
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a Hugging Face ``config.json`` dict of a Llama model."""
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rope_theta=float(theta),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int64 ``[T]`` or ``[B, T]`` -> cos, sin float32 ``[T, head_dim]`` or ``[B, 1, T, head_dim]``
    (Hugging Face "rotate_half" layout; the batched form broadcasts over heads)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    if emb.dim() == 3:
        emb = emb.unsqueeze(1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """x ``[B, H, T, D]``; rope = (cos, sin ``[T, D]`` or ``[B, 1, T, D]``) (``--ops fused`` programs apply it in
    ``kvexport::layer_attention``, the same arithmetic)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, T, dim]`` -> q ``[B, T, Hq·D]``, k, v ``[B, T, H·D]`` (before RoPE)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope, cache, step, layer: int) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.o_proj(cache.attend(step, layer, q, k, v, rope))  # attend: [B, T, Hq·D]


def rope_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple, head_dim: int):
    """The projection's q ``[B, T, Hq·D]``, k, v ``[B, T, H·D]`` -> q ``[B, Hq, T, D]``, k, v ``[B, H, T, D]``,
    RoPE applied to q and k: what every cache's ``attend`` (and ``kvexport::layer_attention``) does first."""
    q, k, v = (split_heads(x, head_dim) for x in (q, k, v))
    return apply_rope(q, rope), apply_rope(k, rope), v


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, H·D]`` -> ``[B, H, T, D]``."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H·D]`` (the output projection's input)."""
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)


def stacked_linear(*parts: nn.Linear) -> nn.Linear:
    """One bias-free linear whose output rows are ``parts``' rows in order (their outputs, concatenated)."""
    out = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False)
    out.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    return out


class FusedAttention(Attention):
    """:class:`Attention` with q, k and v in ONE linear (rows q, then k, then v): one GEMM, and with
    quantized weights one activation quantization and one block-sum, instead of three. Every output
    row is the same dot product as before, so weight formats that work per row (every one here) give
    the same codes; only float summation order may differ."""

    def __init__(self, att: Attention):
        nn.Module.__init__(self)
        self.n_heads, self.n_kv_heads, self.head_dim = att.n_heads, att.n_kv_heads, att.head_dim
        self.qkv_proj = stacked_linear(att.q_proj, att.k_proj, att.v_proj)
        self.o_proj = att.o_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq, h = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.qkv_proj(x).split([hq, h, h], dim=-1)  # of [B, T, (Hq + 2H)·D]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedFeedForward(FeedForward):
    """:class:`FeedForward` with gate and up in ONE linear (rows gate, then up); see :class:`FusedAttention`."""

    def __init__(self, ff: FeedForward):
        nn.Module.__init__(self)
        self.gate_up_proj = stacked_linear(ff.gate_proj, ff.up_proj)
        self.down_proj = ff.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # of [B, T, 2·intermediate]
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache, step, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, step, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names follow Hugging Face's ``LlamaForCausalLM`` minus the ``model.`` prefix."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache) -> torch.Tensor:
        """Run the chunk through all layers, attending over ``cache``; returns logits ``[B, T, V]``."""
        return self.forward_step(tokens, input_pos, cache)[0]

    def forward_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache):
        """As :meth:`forward`, returning ``(logits [B, T, V], step)`` for ``cache.commit(step, ...)``."""
        hidden, step = self.hidden_step(tokens, input_pos, cache)
        return self.logits(hidden), step

    def hidden_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache):
        """Start a step and run the chunk through all layers: ``(hidden [B, T, dim], step)``."""
        positions = input_pos + torch.arange(tokens.shape[1], device=tokens.device)
        step = cache.begin(input_pos)
        return self.hidden(tokens, positions, cache, step), step

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache, step) -> torch.Tensor:
        """Last layer's output (before the final norm) ``[B, T, dim]``; positions ``[T]`` or ``[B, T]``.
        ``step`` is what ``cache.attend`` takes with each layer (``cache.begin``'s value)."""
        rope = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, step, i)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: ``[..., dim]`` -> float32 ``[..., vocab]``."""
        return self.lm_head(self.norm(hidden))

    def fuse_projections(self) -> "Transformer":
        """Every block's q/k/v and gate/up linears stacked into one linear each (:class:`FusedAttention`,
        :class:`FusedFeedForward`), in place: the form every program and reference runs (4 linears per
        block instead of 7). Parameter names then differ from Hugging Face's; load weights before."""
        for block in self.layers:
            if type(block.self_attn) is Attention:
                block.self_attn = FusedAttention(block.self_attn)
            if type(block.mlp) is FeedForward:
                block.mlp = FusedFeedForward(block.mlp)
        return self

    def map_hf_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A Hugging Face Llama state dict (keys with or without the ``model.`` prefix) under this
        module's names."""
        mapped = {k.removeprefix("model."): v for k, v in state.items()}
        if self.args.tie_embeddings:
            mapped.pop("lm_head.weight", None)
            if "embed_tokens.weight" in mapped:
                mapped["lm_head.weight"] = mapped["embed_tokens.weight"]
        return {k: v for k, v in mapped.items() if not k.endswith("rotary_emb.inv_freq")}

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face Llama state dict (keys with or without the ``model.`` prefix)."""
        missing, unexpected = self.load_state_dict(self.map_hf_state_dict(state), strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
