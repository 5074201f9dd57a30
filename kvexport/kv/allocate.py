"""The overflow rule: which pool slot each token leaving the window gets (the spec of ``kvexport::allocate``).

Tokens ``i = 0..N-1`` (position order) each want a class ``desired[i]`` (an index into
:data:`kvexport.kv.policy.CLASSES`, cheapest first). A token goes to its class if that pool has room,
otherwise to the nearest cheaper class with room, otherwise to the nearest dearer one: in round ``r``
a token tries class

    ``d`` (r = 0),   ``d - r`` (1 <= r <= d),   ``r`` (r > d),

and within a round, classes are served in index order and tokens in position order, each placed one
getting the next free slot ``fill[c]`` of its pool. Invalid tokens (``valid[i]`` false) are not placed:
class -1, slot 0. Pools are never evicted, so ``fill`` only grows; a token finds no slot only when
every pool is full, which the sizing rule (``CacheLayout.build``) rules out.

:func:`allocate` is vectorised (a cumulative sum ranks a round's candidates), branch-free and made of
core ATen ops only, so it exports as it is; the ExecuTorch kernel runs the same rule as one call.
"""

from __future__ import annotations

import torch


def round_target(desired: torch.Tensor, r: int) -> torch.Tensor:
    """The class each token tries in round ``r`` (module doc)."""
    return torch.where(desired >= r, desired - r, r)


def allocate(desired: torch.Tensor, valid: torch.Tensor, fill: torch.Tensor, caps: torch.Tensor):
    """desired int64 ``[N]``, valid bool ``[N]``, fill / caps int64 ``[K]`` -> (class int64 ``[N]``,
    slot int64 ``[N]``, new fill int64 ``[K]``)."""
    cls = torch.full_like(desired, -1)
    slot = torch.zeros_like(desired)
    done = ~valid
    for r in range(caps.shape[0]):
        target = round_target(desired, r)
        new_fill = []
        for c in range(caps.shape[0]):
            want = (~done) & (target == c)
            rank = torch.cumsum(want.long(), 0) - 1  # [N] order among this round's candidates for c
            ok = want & (fill[c] + rank < caps[c])
            slot = torch.where(ok, fill[c] + rank, slot)
            cls = torch.where(ok, c, cls)
            done = done | ok
            new_fill.append(fill[c] + ok.sum())
        fill = torch.stack(new_fill)
    return cls, slot, fill
