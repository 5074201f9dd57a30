"""The passkey retrieval probe, generated offline: a 5-digit key planted in filler text, asked for at the end.

An item of context length ``N`` at depth ``d`` is, in tokens (each piece encoded on its own, then joined)::

    INTRO | filler[:a] | NEEDLE(key) | filler[a:] | QUESTION    -> continuations " <key>" and 9 distractors

* the filler is ``FILLER_SENTENCES`` repeated (``filler="repeat"``, the classic passkey test) or ``F``
  consecutive document tokens (``filler="text"``; trial ``t`` starts at token ``t * N mod (len - F + 1)``);
* ``a = round(d * F)`` of the ``F`` filler tokens precede the needle (``d = 0.1``: the key sits near the
  start, about ``0.9 N`` tokens before the question); repeated filler cuts at a sentence-group boundary;
* the context is ``N - len(answer)`` tokens, so context + answer fill exactly ``N`` positions;
* trial ``t`` draws its key and :data:`N_DISTRACTORS` other 5-digit keys from ``seed`` and ``t``: the same
  key at every depth, context length and policy (paired comparisons).

Digits are single tokens in the SmolLM vocabulary, so every candidate has the answer's token length and
``acc`` (the answer has the highest summed log-probability among the 10 candidates; chance 10%) compares
like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROBE_VERSION = "passkey-v1"  # bump when the item construction changes (part of the resume key)
FILLERS = ("repeat", "text")
N_DISTRACTORS = 9
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it at the end.\n\n"
)
FILLER_SENTENCES = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class ProbeItem:
    context: list[int]
    continuations: list[list[int]]  # the answer first, then the distractors
    key: str
    distractors: tuple[str, ...]
    depth: float
    trial: int
    needle_at: int  # token position where the needle starts


def trial_keys(seed: int, trial: int) -> tuple[str, tuple[str, ...]]:
    """(key, distractors) of one trial: distinct 5-digit numbers drawn from ``(seed, trial)``."""
    rng = np.random.default_rng([seed, trial])
    keys = rng.choice(np.arange(10_000, 100_000), size=1 + N_DISTRACTORS, replace=False)
    return str(keys[0]), tuple(str(k) for k in keys[1:])


def min_context(tokenizer) -> int:
    """The shortest context with at least one filler token."""
    fixed = [INTRO, NEEDLE.format(key="00000"), QUESTION, ANSWER.format(key="00000")]
    return sum(len(tokenizer.encode(t)) for t in fixed) + 1


def _filler(tokenizer, n: int, trial: int, filler: str, text_ids: list[int] | None) -> tuple[list[int], int]:
    """(``n`` filler tokens, token period of the repeated unit; 1 for text filler)."""
    if filler == "text":
        start = (trial * n) % (len(text_ids) - n + 1)
        return text_ids[start : start + n], 1
    unit = tokenizer.encode(FILLER_SENTENCES)
    return (unit * (n // len(unit) + 1))[:n], len(unit)


def probe_item(tokenizer, n: int, depth: float, trial: int, seed: int, filler: str = "repeat",
               text_ids: list[int] | None = None) -> ProbeItem:
    """One item of context length ``n`` (context + answer tokens); see the module docstring."""
    key, distractors = trial_keys(seed, trial)
    intro, question = tokenizer.encode(INTRO), tokenizer.encode(QUESTION)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    conts = [tokenizer.encode(ANSWER.format(key=k)) for k in (key, *distractors)]
    n_fill = n - len(conts[0]) - len(intro) - len(needle) - len(question)
    if n_fill < 1:
        raise ValueError(f"a passkey item needs at least {min_context(tokenizer)} tokens, got {n}")
    if len({len(c) for c in conts}) != 1:
        raise ValueError("this tokenizer splits 5-digit keys into different numbers of tokens")
    if filler == "text" and len(text_ids) < n_fill:
        raise ValueError(f"the text has {len(text_ids)} tokens, fewer than the {n_fill} filler tokens needed")
    fill, period = _filler(tokenizer, n_fill, trial, filler, text_ids)
    a = round(depth * n_fill / period) * period if period > 1 else round(depth * n_fill)
    a = min(a, n_fill)
    context = intro + fill[:a] + needle + fill[a:] + question  # [n - len(answer)]
    return ProbeItem(context, conts, key, distractors, depth, trial, len(intro) + a)


def item_scores(scores: list[float]) -> dict:
    """Metrics of one item from the summed log-probabilities of ``[answer, *distractors]``."""
    rank = sum(s >= scores[0] for s in scores[1:])  # a tie counts against the answer
    return {"acc": float(rank == 0), "rank": rank, "answer_logprob": scores[0],
            "margin": scores[0] - max(scores[1:])}
