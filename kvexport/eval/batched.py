"""Batched evaluation engine: many items per forward, the same numbers as the cache path.

The cache path (:meth:`kvexport.session.Session.score_continuations`) feeds one item's context
chunk by chunk through the mixed-precision cache, then teacher-forces the continuations as one
batch. Here each item becomes ONE packed row ``[context | cont_1 | ... | cont_k]`` and many items
are the rows of one batch, so the work is a few large matrix products instead of many small ones
(and it runs on a GPU). What the cache makes each query see is reproduced by two masks per row:

* ``fp``     the key as sinks, window, 16-bit pool or the chunk itself hold it (rounded to the
             cache's float dtype, the same values the cache stores);
* ``stored`` the key as its quantized pool holds it: ``dequantize(quantize(k_fp))`` at its class.

With chunk ``C`` (``chunk(p) = p // C``), a context token ``j`` leaves the window at the commit of
chunk ``evict(j)`` (:func:`kvexport.kv.schedule.evict_chunk`: ``chunk(j + W)`` for ``j >= S`` when
``j + W < n``, never otherwise; ``W = 0``: ``chunk(j)``). A context query ``i`` sees key ``j <= i``
stored iff ``evict(j) < chunk(i)``; continuation queries come after the whole context was committed
(stored iff evicted at all) and see their own earlier tokens at full precision.

Classes. Static and random policies depend on the position only: one pass. Feature policies
(``rule``, ``learned``) decide from features the cache computes under quantization (the token's
next-token entropy and top probability, last-layer attention it received until eviction). Because
a decision at one commit depends only on decisions at earlier commits, the classes are the unique
fixed point of "run the context with these classes, recompute the classes"; iteration reaches it
(typically in 2-3 context passes). Items that have not settled after ``max_passes``, and items
whose classes would overflow a pool (the cache then moves tokens to other classes), are scored by
the cache path instead. Tests hold both paths to the same scores and KV statistics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from kvexport.kv import quant, schedule
from kvexport.kv.cache import MixedKVCache
from kvexport.kv.policy import CLASSES
from kvexport.kv.schedule import NEVER
from kvexport.models.llama import merge_heads, rope_heads

LOGIT_ROWS = 2048  # rows per LM-head call (bounds the [rows, vocab] logits tensor)


@dataclass
class PackedStep:
    """One pass over packed rows: what :meth:`PackedCache.attend` takes with each layer."""

    fp: torch.Tensor  # bool [B, 1, 1, T, T] (query, key): the key seen at full precision
    stored: torch.Tensor  # bool [B, 1, 1, T, T]: the key seen as its pool stores it
    classes: torch.Tensor  # int64 [B, T]: key class (index into CLASSES)
    keep_probs: bool  # keep the last layer's attention probabilities (for the attention features)
    any_stored: bool  # some key is seen stored (else the quantized path is skipped)
    last_probs: torch.Tensor | None = None  # [B, Hq, T, T], set by the last layer when keep_probs


class PackedCache:
    """Stands in for :class:`MixedKVCache` in :meth:`Transformer.hidden` over packed rows; the
    step value is a :class:`PackedStep` (masks per row)."""

    def __init__(self, cache: MixedKVCache, device: torch.device):
        self.layout = cache.layout
        self.fp_dtype = cache.layout.torch_fp_dtype
        self.rotation = quant.hadamard(cache.layout.head_dim).to(device) if cache.layout.rotation else None

    def _stored_values(self, classes: torch.Tensor, x: torch.Tensor, side: int) -> torch.Tensor:
        """x ``[B, H, T, D]`` (float-rounded keys, ``side`` 0, or values, 1) -> each row as its class's pool
        returns it."""
        out = x
        cls = classes[:, None, :, None]
        for i, c in enumerate(CLASSES[:-1]):
            if bool((classes == i).any()):
                bits, clip = self.layout.side(c, side)
                codes, scale, zero = quant.quantize(x, bits, self.layout.group, clip)
                out = torch.where(cls == i, quant.dequantize(codes, scale, zero, self.layout.group), out)
        return out

    def attend(self, step: PackedStep, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: tuple) -> torch.Tensor:
        """The projection's q ``[B, T, Hq·D]``, k/v ``[B, T, H·D]`` (before RoPE), ``rope`` -> ``[B, T, Hq·D]``."""
        q, k, v = rope_heads(q, k, v, rope, self.layout.head_dim)
        b, hq, t, d = q.shape
        h = k.shape[1]
        lay = self.layout
        if lay.rotate_keys:  # the cache's MatMuls
            q, k = q @ self.rotation, k @ self.rotation
        if lay.rotate_values:
            v = v @ self.rotation
        k = k.to(self.fp_dtype).float()
        v = v.to(self.fp_dtype).float()
        qg = q.reshape(b, h, hq // h, t, d)  # query head h*rep + r reads KV head h
        scale = 1.0 / math.sqrt(d)
        s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, H, rep, T, T]
        if step.any_stored:
            kq, vq = self._stored_values(step.classes, k, 0), self._stored_values(step.classes, v, 1)
            s = torch.where(step.stored, torch.matmul(qg, kq.unsqueeze(2).transpose(-1, -2)) * scale, s)
        s = s.masked_fill(~(step.fp | step.stored), float("-inf"))
        p = torch.softmax(s, dim=-1)
        out = torch.matmul(p * step.fp, v.unsqueeze(2))
        if step.any_stored:
            out = out + torch.matmul(p * step.stored, vq.unsqueeze(2))
        if step.keep_probs and layer == self.layout.n_layers - 1:
            step.last_probs = p.reshape(b, hq, t, t)
        out = out.reshape(b, hq, t, d)
        return merge_heads(out @ self.rotation if lay.rotate_values else out)  # H @ H = I


class Plan:
    """Packed rows for a batch of items: tokens, positions, eviction schedule and masks (CPU).

    ``items``: ``[(context ids, [continuation ids, ...]), ...]``; ``chunk``/``window``/``sinks``
    as the cache uses them. Continuations may be empty lists (WikiText: context only).
    """

    def __init__(self, items, chunk: int, window: int, sinks: int):
        self.items = items
        self.n_ctx = [len(c) for c, _ in items]
        self.starts = []  # per item: packed start of each continuation
        rows = []
        for ctx, conts in items:
            starts, at = [], len(ctx)
            for c in conts:
                starts.append(at)
                at += len(c)
            self.starts.append(starts)
            rows.append(self._row(ctx, conts, chunk, window, sinks))
        self.width = max(r[0].numel() for r in rows)
        self.ctx_width = max(self.n_ctx)
        b, t = len(items), self.width
        self.tokens = torch.zeros(b, t, dtype=torch.int64)
        self.positions = torch.zeros(b, t, dtype=torch.int64)
        self.fp = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)  # padding rows see themselves
        self.stored = torch.zeros(b, t, t, dtype=torch.bool)
        self.evicted = torch.zeros(b, self.ctx_width, dtype=torch.bool)  # context tokens that leave the window
        self.observed = torch.zeros(b, self.ctx_width, self.ctx_width, dtype=torch.bool)  # [query, key]
        for r, (tok, pos, fp, stored, evicted, observed) in enumerate(rows):
            n, m = tok.numel(), evicted.numel()
            self.tokens[r, :n], self.positions[r, :n] = tok, pos
            self.fp[r, :n, :n], self.stored[r, :n, :n] = fp, stored
            self.evicted[r, :m], self.observed[r, :m, :m] = evicted, observed

    @staticmethod
    def _row(ctx, conts, chunk, window, sinks):
        n = len(ctx)
        j = torch.arange(n)
        evict = schedule.evict_chunk(n, sinks, window, chunk)
        n_chunks = (n + chunk - 1) // chunk
        seg = torch.cat(
            [torch.zeros(n, dtype=torch.int64)] + [torch.full((len(c),), k + 1) for k, c in enumerate(conts)]
        )
        pos = torch.cat([j] + [n + torch.arange(len(c)) for c in conts])
        tok = torch.tensor(list(ctx) + [t for c in conts for t in c], dtype=torch.int64)
        q_chunk = torch.where(seg == 0, pos // chunk, n_chunks)
        key_evict = torch.cat([evict, torch.full((tok.numel() - n,), NEVER)])
        idx = torch.arange(tok.numel())
        causal = idx[None, :] <= idx[:, None]
        visible = causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
        stored = visible & (key_evict[None, :] < q_chunk[:, None])
        evicted = evict < NEVER
        observed = (j[None, :] < j[:, None]) & ((j // chunk)[:, None] <= evict[None, :])
        return tok, pos, visible & ~stored, stored, evicted, observed


class BatchedEngine:
    """Scores packed batches with the model and the policy of ``cache`` (a :class:`MixedKVCache`
    built for these options, used for its layout, policy, rarity table and statistics)."""

    def __init__(self, model, cache: MixedKVCache, device: str = "cpu", max_passes: int = 8):
        self.model, self.cache, self.device = model, cache, torch.device(device)
        self.packed = PackedCache(cache, self.device)
        self.policy = copy.deepcopy(cache.policy).to(self.device)  # the cache keeps its own (CPU) policy
        self.rarity = cache.rarity.to(self.device)
        self.max_passes = max_passes
        self.caps = torch.tensor(cache.layout.capacities)

    # ------------------------------------------------------------------ passes
    def _hidden(self, plan: Plan, classes: torch.Tensor, width: int, keep_probs: bool):
        """(hidden ``[B, width, dim]``, the pass's :class:`PackedStep`) over the first ``width`` columns."""
        dev = self.device
        fp, stored = (m[:, None, None, :width, :width].to(dev) for m in (plan.fp, plan.stored))  # [B, 1, 1, w, w]
        step = PackedStep(fp, stored, classes[:, :width].to(dev), keep_probs, bool(stored.any()))
        tokens, positions = plan.tokens[:, :width].to(dev), plan.positions[:, :width].to(dev)
        return self.model.hidden(tokens, positions, self.packed, step), step

    def _log_softmax_slices(self, hidden_rows: torch.Tensor):
        """Yield ``(start, log-softmax of the logits)`` for ``hidden_rows [M, dim]`` in slices of
        ``LOGIT_ROWS`` rows (bounds the ``[rows, vocab]`` tensor)."""
        for i in range(0, hidden_rows.shape[0], LOGIT_ROWS):
            yield i, torch.log_softmax(self.model.logits(hidden_rows[i : i + LOGIT_ROWS]), dim=-1)

    def _log_probs(self, hidden_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Log-probability ``[M]`` of ``targets [M]`` under the logits of ``hidden_rows [M, dim]``."""
        return torch.cat(
            [
                lp.gather(1, targets[i : i + LOGIT_ROWS, None].to(lp.device))[:, 0]
                for i, lp in self._log_softmax_slices(hidden_rows)
            ]
        )

    def _features(self, plan: Plan, hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Feature state ``[B, n, 6]`` (as the cache's ``win_feat``) of every context token, from the
        last layer's attention probabilities ``probs [B, Hq, T, T]``."""
        b, n = len(plan.items), plan.ctx_width
        ent, maxp = [], []
        for _, lp in self._log_softmax_slices(hidden[:, :n].reshape(b * n, -1)):
            ent.append(-(lp.exp() * lp).sum(-1))
            maxp.append(lp.amax(-1).exp())
        p = probs[:, :, :n, :n]  # [B, Hq, query, key]
        w = p * torch.arange(1, n + 1, device=self.device, dtype=p.dtype).view(1, 1, n, 1)  # x visible keys
        obs = plan.observed.to(self.device).float()
        recv = (w.mean(1) * obs).sum(1)
        var = (w.var(1, unbiased=False) * obs).sum(1)
        rarity = self.rarity[plan.tokens[:, :n].to(self.device)]
        return torch.stack([rarity, torch.cat(ent).view(b, n), torch.cat(maxp).view(b, n), recv, var, obs.sum(1)], -1)

    def _decide(self, plan: Plan, feat_state: torch.Tensor | None) -> torch.Tensor:
        """Class index ``[B, n]`` the policy gives each context token when it is evicted."""
        b, n = len(plan.items), plan.ctx_width
        pos = plan.positions[:, :n].to(self.device)
        feats = (
            torch.zeros(b * n, 5, device=self.device)
            if feat_state is None
            else MixedKVCache.policy_inputs(feat_state.reshape(b * n, -1))
        )
        return self.policy(feats, pos.reshape(-1)).reshape(b, n).cpu()

    @torch.no_grad()
    def classes(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Key classes ``[B, width]`` (16-bit for non-evicted and continuation tokens) and a bool
        ``[B]``: the item's classes are settled (else it needs the cache path)."""
        b, n = len(plan.items), plan.ctx_width
        full = torch.full((b, plan.width), CLASSES.index(16), dtype=torch.int64)
        if not self.policy.needs_features:
            full[:, :n] = torch.where(plan.evicted, self._decide(plan, None), full[:, :n])
            return full, torch.ones(b, dtype=torch.bool)
        settled = torch.zeros(b, dtype=torch.bool)
        for _ in range(self.max_passes):
            hidden, step = self._hidden(plan, full, n, keep_probs=True)
            decided = self._decide(plan, self._features(plan, hidden, step.last_probs))
            new = torch.where(plan.evicted, decided, full[:, :n])
            settled = (new == full[:, :n]).all(1)
            if bool(settled.all()):
                break
            full[:, :n] = new
        return full, settled

    @staticmethod
    def _evicted_counts(plan: Plan, classes: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, 4]``: context tokens that left the window, per class."""
        onehot = torch.nn.functional.one_hot(classes[:, : plan.ctx_width], len(CLASSES))
        return (onehot * plan.evicted.unsqueeze(-1)).sum(1)

    def fits(self, plan: Plan, classes: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``: every class's pool has room for the item's evicted tokens (no overflow)."""
        return (self._evicted_counts(plan, classes) <= self.caps).all(1)

    def stats(self, plan: Plan, classes: torch.Tensor) -> torch.Tensor:
        """The cache's ``stats()`` vector ``[B, 8]`` after each item's context."""
        lay = self.cache.layout
        counts = self._evicted_counts(plan, classes)
        n_ctx = torch.tensor(plan.n_ctx)
        counts[:, CLASSES.index(16)] += schedule.fp_resident(n_ctx, lay.sinks, lay.window)
        return self.cache.stats_for_counts(counts)

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def score(self, plan: Plan, classes: torch.Tensor) -> list[list[float]]:
        """Summed log-probability of every continuation of every item (one full pass)."""
        hidden, _ = self._hidden(plan, classes, plan.width, keep_probs=False)
        rows, cols, targets, owner = [], [], [], []
        for r, ((ctx, conts), starts) in enumerate(zip(plan.items, plan.starts)):
            for k, (cont, s) in enumerate(zip(conts, starts)):
                prev = [len(ctx) - 1] + list(range(s, s + len(cont) - 1))  # the position predicting each token
                rows += [r] * len(cont)
                cols += prev
                targets += cont
                owner += [(r, k)] * len(cont)
        lp = self._log_probs(hidden[torch.tensor(rows), torch.tensor(cols)], torch.tensor(targets)).double().cpu()
        scores = [[0.0] * len(conts) for _, conts in plan.items]
        for (r, k), v in zip(owner, lp.tolist()):
            scores[r][k] += v
        return scores

    @torch.no_grad()
    def token_logprobs(self, plan: Plan, classes: torch.Tensor) -> list[torch.Tensor]:
        """Per item (context only): log-softmax of each position's next-token logits ``[n - 1, V]``."""
        hidden, _ = self._hidden(plan, classes, plan.ctx_width, keep_probs=False)
        return [
            torch.log_softmax(self.model.logits(hidden[r, : m - 1]), dim=-1).cpu() for r, m in enumerate(plan.n_ctx)
        ]
