"""Token-frequency table for the rarity feature, counted on a documented corpus.

Corpus: the first half (by lines) of WikiText-2 raw test, ``wikitext-2-raw/wiki.test.raw`` of the
data folder (:mod:`kvexport.data`; the second half is held out for evaluation). Rarity of token ``i``
is ``-log((count_i + 1) / (total + V))`` (add-one smoothing), so unseen tokens are the rarest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from kvexport.models.tokenizer import Tokenizer


def wikitext_halves(path: Path) -> tuple[str, str]:
    """(calibration half, held-out half) of a WikiText raw file, split by line count."""
    lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    mid = len(lines) // 2
    return "".join(lines[:mid]), "".join(lines[mid:])


def count_tokens(tokenizer: Tokenizer, text: str) -> Counter:
    counts = Counter()
    for para in text.split("\n \n"):
        counts.update(tokenizer.encode(para))
    return counts


def write_counts(path: Path, counts: Counter, vocab_size: int, corpus: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"corpus": corpus, "vocab_size": vocab_size, "total": sum(counts.values()),
           "smoothing": "add-one", "counts": {str(k): v for k, v in sorted(counts.items())}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    tmp.replace(path)


def load_rarity(path: Path, vocab_size: int) -> torch.Tensor:
    """float32 ``[vocab_size]`` of -log smoothed frequencies."""
    doc = json.loads(Path(path).read_text())
    counts = torch.zeros(vocab_size)
    for k, v in doc["counts"].items():
        if int(k) < vocab_size:
            counts[int(k)] = v
    return -torch.log((counts + 1) / (doc["total"] + vocab_size))

