"""Scoring protocol and the ``Scorer`` interface backends implement.

Protocol (reference backend): for each item the cache is reset, the context goes through the cache
as decoding would (chunks of ``prefill_chunk`` tokens: tokens enter the FP16 window, leave it and
are stored at the policy's precision), then all continuations are teacher-forced as one batch over
that quantized cache without being committed (:meth:`kvexport.session.Session.score_continuations`).
The score of a continuation is the sum of its tokens' log-probabilities. KV statistics are read
after the context prefill (sinks and window count at 16 bits).

``prefill_chunk``: ``Session.prefill`` uses chunks of ``window`` tokens (64 when the window is 0);
inside a chunk tokens see each other at full precision. With ``--kv-window 0`` the eval default is
chunks of 1 token, i.e. exactly token-by-token decoding, so every context token is quantized before
any later token attends to it.

Tokenisation follows lm-evaluation-harness: trailing spaces of the context move to the
continuation, ``continuation_ids = encode(context + continuation)[len(encode(context)):]``.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from kvexport.errors import KvxError
from kvexport.kv import stats as kv_stats
from kvexport.models.loader import LoadedModel
from kvexport.session import CacheOptions, Session

SCORING_VERSION = "score_continuations-v1"  # bump when the protocol changes (part of the resume key)


@runtime_checkable
class Scorer(Protocol):
    """What the harness needs from a backend (one policy, one cache configuration).

    * ``score(context, continuations)``: reset the cache, feed ``context`` (token ids) as decoding
      would, return the summed log-probability of each continuation (token ids) given the context.
    * ``kv_stats()``: ``Session.kv_stats()``-style dict (``avg_bits``, ``kv_bytes_used``,
      ``kv_bytes_allocated``, ``class_histogram``, ``tokens_cached``) of the cache as the last
      ``score`` left it after the context (continuations are not committed).
    * ``token_logprobs(ids)``: log-softmax of every position's next-token logits ``[T, V]`` with
      ``ids`` fed through a fresh cache (WikiText perplexity/KL).
    * ``describe()``: JSON-able identity of the backend + cache (goes into the resume key).

    The exported backends (``--backend executorch|onnx``) implement it with a decode protocol:
    :class:`kvexport.eval.program_scorer.ProgramScorer`.
    """

    def score(self, context: list[int], continuations: list[list[int]]) -> list[float]: ...

    def kv_stats(self) -> dict: ...

    def token_logprobs(self, ids: list[int]) -> torch.Tensor: ...

    def describe(self) -> dict: ...


class EvalSession(Session):
    """A :class:`Session` whose prefill chunk can be smaller than the window (1 = decoding)."""

    def __init__(self, loaded: LoadedModel, opts: CacheOptions, model=None, prefill_chunk: int | None = None):
        super().__init__(loaded, opts, model=model)
        self.prefill_chunk = prefill_chunk

    @property
    def max_chunk(self) -> int:
        base = super().max_chunk
        return min(base, self.prefill_chunk) if self.prefill_chunk else base


def default_prefill_chunk(opts: CacheOptions) -> int:
    """Chunk used to feed contexts: the window (as ``Session.prefill``), or 1 when the window is 0."""
    return opts.window if opts.window > 0 else 1


def _file_sha256(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"


def score_each(scorer: Scorer, pairs) -> list[tuple[list[float], dict, str]]:
    """(scores, kv_stats, ``"cache"``) per item, one ``score`` call each (no batched engine)."""
    return [(scorer.score(c, k), scorer.kv_stats(), "cache") for c, k in pairs]


class ReferenceScorer:
    """The PyTorch reference behind the :class:`Scorer` interface.

    ``batch_items > 1`` scores items in packed batches (:mod:`kvexport.eval.batched`, on ``device``)
    with the same numbers; items the batched engine cannot settle go through the cache path
    (:class:`EvalSession`, CPU). ``batch_items`` and ``device`` are not part of ``describe()``:
    they change the speed, not the protocol.
    """

    backend = "reference"

    def __init__(
        self,
        loaded: LoadedModel,
        opts: CacheOptions,
        model=None,
        prefill_chunk: int | None = None,
        batch_items: int = 1,
        device: str = "cpu",
    ):
        self.opts = opts
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(opts)
        self.session = EvalSession(loaded, opts, model=model, prefill_chunk=self.prefill_chunk)
        self._policy_info = self.session.cache.policy.describe()
        self.batch_items = batch_items
        self.engine = None
        if batch_items > 1:
            from kvexport.eval.batched import BatchedEngine

            on_device = self.session.model if device == "cpu" else copy.deepcopy(self.session.model).to(device)
            self.engine = BatchedEngine(on_device, self.session.cache, device=device)
        self._stats: dict | None = None

    def score(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        scores = self.session.score_continuations(context, continuations)
        self._stats = None
        return scores

    def kv_stats(self) -> dict:
        return self._stats if self._stats is not None else self.session.kv_stats()

    def score_many(self, pairs: list[tuple[list[int], list[list[int]]]]) -> list[tuple[list[float], dict, str]]:
        """(scores, kv_stats, path) per item; path ``packed`` (batched engine) or ``cache``."""
        if self.engine is None:
            return score_each(self, pairs)
        for ctx, conts in pairs:
            self.session.check_scoring_input(ctx, conts)
        plan, classes, ok = self._plan(pairs)
        scores = self.engine.score(plan, classes)
        stats = self.engine.stats(plan, classes)
        out = []
        for i, (ctx, conts) in enumerate(pairs):
            if ok[i]:
                out.append((scores[i], kv_stats.readable(stats[i]), "packed"))
            else:
                out.append((self.score(ctx, conts), self.kv_stats(), "cache"))
        return out

    def _plan(self, pairs):
        from kvexport.eval.batched import Plan

        lay = self.session.cache.layout
        plan = Plan(pairs, self.session.max_chunk, lay.window, lay.sinks)
        classes, settled = self.engine.classes(plan)
        return plan, classes, (settled & self.engine.fits(plan, classes)).tolist()

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        if self.engine is not None:
            self.session.check_room(len(ids), start=0)
            plan, classes, ok = self._plan([(ids, [])])
            if ok[0]:
                self._stats = kv_stats.readable(self.engine.stats(plan, classes)[0])
                return self.engine.token_logprobs(plan, classes)[0]
        self.session.reset()
        self._stats = None
        return torch.log_softmax(self.session.prefill(ids)[:-1], dim=-1)

    def describe(self) -> dict:
        info = {
            "backend": self.backend,
            "cache": self.opts.to_dict(),
            "prefill_chunk": self.prefill_chunk,
            "layout": {"capacities": list(self.session.cache.layout.capacities)},
            "scoring": SCORING_VERSION,
        }
        if "controller" in self._policy_info:  # a retrained controller must not reuse old records
            info["controller_sha256"] = _file_sha256(self._policy_info["controller"])
        return info


def make_scorer(
    backend: str,
    loaded: LoadedModel,
    opts: CacheOptions,
    model=None,
    prefill_chunk: int | None = None,
    batch_items: int = 1,
    device: str = "cpu",
) -> Scorer:
    """The reference scorer (program backends: :class:`kvexport.eval.program_scorer.ProgramScorer`)."""
    if backend != "reference":
        raise KvxError(f"--backend {backend} scores a built program: give it with --program graphs/<name>")
    return ReferenceScorer(
        loaded, opts, model=model, prefill_chunk=prefill_chunk, batch_items=batch_items, device=device
    )


def with_policy(opts: CacheOptions, policy: str) -> CacheOptions:
    return replace(opts, policy=policy)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context ids, continuation ids) split from the joint encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def choice_metrics(scores: list[float], choices: list[str] | tuple[str, ...], gold: int) -> dict:
    """``acc``/``acc_norm`` of one item (ties go to the first choice, as ``numpy.argmax``)."""
    if len(scores) != len(choices) or not scores:
        raise ValueError("one score per choice is needed")
    lengths = [max(len(c.encode("utf-8")), 1) for c in choices]
    norm = [s / n for s, n in zip(scores, lengths)]
    pred = max(range(len(scores)), key=lambda i: (scores[i], -i))
    pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return {
        "pred": pred,
        "pred_norm": pred_norm,
        "acc": float(pred == gold),
        "acc_norm": float(pred_norm == gold),
        "choice_bytes": lengths,
    }
