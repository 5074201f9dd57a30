"""A model + mixed-precision cache ready to run: build it from options, prefill, decode, generate.

This is the PyTorch reference every exported program is compared against.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from kvexport.errors import KvxError
from kvexport.kv import quant
from kvexport.kv import stats as kv_stats
from kvexport.kv.cache import CacheLayout, MixedKVCache
from kvexport.kv.policy import build_policy, parse_policy
from kvexport.models.llama import Transformer
from kvexport.models.loader import LoadedModel
from kvexport.options import CacheOptions

DEFAULT_BUDGET_BITS = 4.0


def calibration_dir() -> Path:
    """Committed controllers and token tables: ``$KVEXPORT_CALIBRATION``, else the source checkout's
    ``calibration/`` folder, else the copy an installed wheel ships in ``<prefix>/share/kvexport``."""
    env = os.environ.get("KVEXPORT_CALIBRATION")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "calibration"
    return checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "kvexport" / "calibration"


def _model_calibration_dir(model_name: str) -> Path:
    """Calibration folder of a model; random-weight builds and other SmolLM sizes share the default's
    token table (one vocabulary for the whole family)."""
    return calibration_dir() / model_name.removesuffix("-random")


def rarity_table(model_name: str, vocab_size: int) -> torch.Tensor | None:
    """-log smoothed frequency per token id, float32 ``[vocab]``, from the committed token counts."""
    from kvexport.controller.token_counts import load_rarity
    from kvexport.models.registry import DEFAULT_MODEL

    for name in (model_name.removesuffix("-random"), DEFAULT_MODEL):
        path = calibration_dir() / name / "token_counts.json"
        if path.is_file():
            return load_rarity(path, vocab_size)
    return None


def default_controller_path(model_name: str, budget_bits: float | None) -> Path:
    """The committed controller for a model and budget: ``calibration/<model>/controller-<B>.safetensors``."""
    budget = DEFAULT_BUDGET_BITS if budget_bits is None else budget_bits
    return _model_calibration_dir(model_name) / f"controller-{budget:g}.safetensors"


def build_cache(
    loaded: LoadedModel, opts: CacheOptions, trim: bool = True, fused_ops: bool = False, layer_kernel: bool = False,
    fwht: bool = False, onnx_kernel: bool = False,
) -> MixedKVCache:
    """Cache (with its policy) for ``loaded`` under ``opts``; :class:`KvxError` on bad options.
    ``fused_ops`` / ``layer_kernel`` / ``fwht`` / ``onnx_kernel``: see :class:`MixedKVCache`."""
    args = loaded.args
    group = opts.group or args.head_dim
    if opts.max_context < 1:
        raise KvxError(f"--max-context must be positive, got {opts.max_context}")
    if opts.max_context > args.max_position:
        raise KvxError(f"--max-context {opts.max_context} exceeds the model's {args.max_position} positions")
    try:
        spec = parse_policy(opts.policy, seed=opts.seed)
        pool_share = max(opts.max_context - opts.sinks - opts.window, 0) / opts.max_context
        value_bits = quant.parse_classes(",".join(filter(None, (opts.classes, spec.classes))))  # the policy's last
        policy = build_policy(spec, group, pool_share, default_controller_path(loaded.name, opts.budget_bits),
                              value_bits)
        layout = CacheLayout.build(
            n_layers=args.n_layers,
            n_kv_heads=args.n_kv_heads,
            head_dim=args.head_dim,
            max_context=opts.max_context,
            sinks=opts.sinks,
            window=opts.window,
            group=group,
            fractions=policy.fractions,
            fp_dtype="float32" if spec.kind == "fp32" else "float16",
            rotate_keys=opts.rotate_keys,
            rotate_values=opts.rotate_values,
            clip=quant.parse_clip(opts.clip),
            value_bits=value_bits,
        )
    except ValueError as err:
        raise KvxError(str(err)) from None
    rarity = rarity_table(loaded.name, args.vocab_size)
    if rarity is None:
        if policy.needs_features:
            raise KvxError(
                f"policy '{opts.policy}' needs a token-count table; run 'kvexport count-tokens --model {loaded.name}'"
            )
        rarity = torch.zeros(args.vocab_size)
    return MixedKVCache(layout, policy, rarity, trim=trim, fused_ops=fused_ops, layer_kernel=layer_kernel, fwht=fwht,
                        onnx_kernel=onnx_kernel)


class Session:
    """Reference runner: ``prefill`` a prompt in chunks, then ``decode`` one token at a time."""

    def __init__(self, loaded: LoadedModel, opts: CacheOptions, model: Transformer | None = None, fwht: bool = False):
        self.loaded = loaded
        self.opts = opts
        self.model = model or loaded.build()
        self.cache = build_cache(loaded, opts, fwht=fwht)  # fwht: see MixedKVCache
        self.tokenizer = loaded.tokenizer
        self.pos = 0

    @property
    def max_chunk(self) -> int:
        return self.cache.max_chunk

    def reset(self) -> None:
        self.cache.reset()
        self.pos = 0

    def check_room(self, n_tokens: int, start: int | None = None) -> None:
        """:class:`KvxError` unless ``n_tokens`` fit after position ``start`` (default: where the cache is)."""
        end = (self.pos if start is None else start) + n_tokens
        if end > self.opts.max_context:
            raise KvxError(
                f"{end} tokens exceed the cache's context of {self.opts.max_context}; "
                "raise --max-context or shorten the prompt"
            )

    @torch.no_grad()
    def step(self, ids: list[int]) -> torch.Tensor:
        """Run and commit one chunk (``len(ids) <= max_chunk``); returns logits float32 ``[T, V]``."""
        tokens = torch.tensor([ids], dtype=torch.int64)
        logits, step = self.model.forward_step(tokens, torch.tensor([self.pos]), self.cache)
        self.cache.commit(step, tokens, logits)
        self.pos += len(ids)
        return logits[0]

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed a prompt in chunks; returns the logits of every prompt token ``[T, V]``."""
        self.check_room(len(ids))
        return torch.cat([self.step(ids[i : i + self.max_chunk]) for i in range(0, len(ids), self.max_chunk)])

    def check_scoring_input(self, context: list[int], continuations: list[list[int]]) -> None:
        """``ValueError`` for an empty context or continuation, :class:`KvxError` when they do not fit."""
        if not context or not continuations or not all(continuations):
            raise ValueError("context and every continuation need at least one token")
        self.check_room(len(context) + max(map(len, continuations)), start=0)  # scoring starts from an empty cache

    @torch.no_grad()
    def score_continuations(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        """Sum of log-probabilities of each continuation after ``context``.

        The context goes through the cache exactly as decoding would (chunks, window, eviction,
        quantization); the continuations are then teacher-forced together as one batch over that
        quantized cache without being committed. Returns one float per continuation.
        """
        self.check_scoring_input(context, continuations)
        self.reset()
        last = torch.log_softmax(self.prefill(context)[-1], dim=-1)
        width = max(map(len, continuations))
        tokens = torch.tensor([c + [c[-1]] * (width - len(c)) for c in continuations], dtype=torch.int64)
        logp = torch.log_softmax(self.model(tokens, torch.tensor([self.pos]), self.cache), dim=-1)
        scores = []
        for row, cont in enumerate(continuations):
            total = last[cont[0]].item()
            if len(cont) > 1:
                total += logp[row, torch.arange(len(cont) - 1), torch.tensor(cont[1:])].sum().item()
            scores.append(total)
        return scores

    def kv_stats(self) -> dict:
        return kv_stats.readable(self.cache.stats())

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token=None) -> dict:
        """Greedy generation; ``on_token(id)`` is called for each new token. Returns ids + timings."""
        if not prompt_ids:
            raise KvxError("the prompt is empty")
        self.check_room(len(prompt_ids))
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)[-1]
        t1 = time.perf_counter()
        out = []
        budget = min(max_new_tokens, self.opts.max_context - self.pos)
        for _ in range(budget):
            tok = int(logits.argmax())
            out.append(tok)
            if on_token:
                on_token(tok)
            if tok in self.tokenizer.eos_ids or len(out) == budget:
                break
            logits = self.step([tok])[-1]
        t2 = time.perf_counter()
        n_decode = max(len(out) - 1, 0)
        return {
            "new_ids": out,
            "prefill_tokens": len(prompt_ids),
            "prefill_tok_s": len(prompt_ids) / max(t1 - t0, 1e-9),
            "decode_tok_s": n_decode / (t2 - t1) if n_decode else None,
            "stopped_at_context": len(out) < max_new_tokens and (not out or out[-1] not in self.tokenizer.eos_ids),
        }
