"""Controller features exactly as the cache computes them at eviction time.

:class:`RecordingPolicy` wraps any policy: the cache calls ``policy(feats [N, 5], pos [N])`` when
tokens leave the FP16 window, with the features the exported program sees; the wrapper keeps
``(pos, feats)`` for every real candidate (``pos >= 0``) and delegates the decision. Nothing in the
cache changes.
"""

from __future__ import annotations

import torch

from kvexport.kv.policy import FEATURES, Policy


class RecordingPolicy(Policy):
    """Delegating policy that records the features of every evicted token."""

    needs_features = True

    def __init__(self, inner: Policy):
        super().__init__()
        self.inner = inner
        self.fractions = inner.fractions
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        keep = pos >= 0
        self.records.append((pos[keep].clone(), feats[keep].detach().clone()))
        return self.inner(feats, pos)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions int64 ``[N]``, features float32 ``[N, 5]``) recorded since the last call, by position."""
        if not self.records:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, len(FEATURES))
        pos = torch.cat([p for p, _ in self.records])
        feats = torch.cat([f for _, f in self.records])
        self.records = []
        order = torch.argsort(pos)
        return pos[order], feats[order]


def record_features(session, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill ``ids`` from an empty cache in ``session`` with a recording wrapper around its policy;
    returns (positions, features) of the tokens evicted from the window, and the prefill logits."""
    cache = session.cache
    inner = cache.policy
    rec = RecordingPolicy(inner)
    cache.policy = rec
    try:
        session.reset()
        logits = session.prefill(ids)
    finally:
        cache.policy = inner
    pos, feats = rec.take()
    return pos, feats, logits
