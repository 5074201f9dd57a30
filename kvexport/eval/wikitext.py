"""WikiText-2 perplexity with the KV policy in the loop: every window is fed through the cache in
decode-sized chunks (tokens enter the window, leave it, get quantized), and each token's
next-token log-probability comes from the logits of that step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from kvexport.models.tokenizer import Tokenizer
from kvexport.session import Session


@torch.no_grad()
def perplexity(session: Session, ids: list[int], window: int, reference: list[torch.Tensor] | None = None,
               progress: bool = True) -> dict:
    """Perplexity over non-overlapping ``window``-token windows, each from an empty cache.

    With ``reference`` (per-window log-probs ``[window-1, V]`` of another policy) it also reports
    the mean KL(reference || this policy). Returns ``ppl``, ``nll``, ``tokens``, ``kl``, KV stats
    at the end of the last window, and ``logprobs`` (for use as a reference).
    """
    nll, count, kl_sum = 0.0, 0, 0.0
    logprobs = []
    windows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    for w, chunk in enumerate(tqdm(windows, desc=session.opts.policy, disable=not progress, leave=False)):
        session.reset()
        lp = torch.log_softmax(session.prefill(chunk)[:-1], dim=-1)
        target = torch.tensor(chunk[1:])
        nll -= lp.gather(1, target[:, None]).sum().item()
        count += len(target)
        if reference is not None:
            ref = reference[w]
            kl_sum += (ref.exp() * (ref - lp)).sum().item()
        logprobs.append(lp)
    stats = session.kv_stats()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "kl": kl_sum / count if reference is not None else None, **stats, "logprobs": logprobs}


def heldout_ids(tokenizer: Tokenizer, path: Path) -> list[int]:
    """Token ids of the held-out half of a WikiText raw file (second half by lines, the split of
    :func:`kvexport.controller.token_counts.wikitext_halves`; the first half calibrates)."""
    from kvexport.controller.token_counts import wikitext_halves

    _, held = wikitext_halves(path)
    return encode_text(tokenizer, held)


def encode_text(tokenizer: Tokenizer, text: str, lines_per_call: int = 200) -> list[int]:
    """Token ids of a long text, encoded ``lines_per_call`` lines at a time (a tokenizer call per block)."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), lines_per_call):
        ids += tokenizer.encode("".join(lines[start : start + lines_per_call]))
    return ids


def windows(ids: list[int], window: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping ``window``-token windows (the last partial one dropped), the first ``limit``."""
    out = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    return out[:limit] if limit is not None else out


def window_scores(lp: torch.Tensor, chunk: list[int], reference: torch.Tensor | None = None) -> dict:
    """Summed NLL of ``chunk[1:]`` under log-probs ``lp [T-1, V]`` and summed KL(reference || lp)."""
    target = torch.tensor(chunk[1:])
    nll = -lp.gather(1, target[:, None]).sum().item()
    kl = (reference.exp() * (reference - lp)).sum().item() if reference is not None else None
    return {"nll_sum": nll, "kl_sum": kl, "tokens": len(target)}
