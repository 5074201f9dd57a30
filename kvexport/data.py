"""Benchmark data: where the HellaSwag, ARC, OpenBookQA and WikiText-2 files come from.

A task's file (:data:`FILES`, relative to a data folder) is found in the first of:

1. ``--data-dir DIR`` (``kvexport eval``, ``calibrate`` and ``count-tokens`` take it);
2. ``$KVEXPORT_DATA``;
3. the per-user cache ``$KVEXPORT_CACHE/data`` (default ``~/.cache/kvexport/data``);
4. the Hugging Face hub copy of the same set (:data:`HUB`; needs ``pip install datasets`` and a
   network), converted once into the per-user cache in the format below, where step 3 finds it.

A folder given by 1 or 2 is the user's choice: a file missing there is an error, not a fall-through.
Errors are one line (:class:`KvxError`) naming the three ways to provide the data.

File formats (what the loaders of :mod:`kvexport.eval.tasks` read):

* ``hellaswag/hellaswag_val_full.txt``: llama.cpp's text format, 6 lines per item:
  ``activity_label: ctx`` (bracketed WikiHow tags removed, ``" [title]"`` -> ``". "``, double spaces
  collapsed), the gold label 0-3, then the 4 endings, cleaned the same way;
* ``arc/ARC-{Easy,Challenge}-Test.jsonl`` and ``openbookqa/test.jsonl``: the ARC JSONL schema,
  one ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` per line;
* ``wikitext-2-raw/wiki.test.raw``: the raw text, the hub rows' ``text`` concatenated.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from kvexport.errors import KvxError
from kvexport.fsutil import cache_root, write_text_atomic

FILES = {
    "hellaswag": "hellaswag/hellaswag_val_full.txt",
    "arc_challenge": "arc/ARC-Challenge-Test.jsonl",
    "arc_easy": "arc/ARC-Easy-Test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
    "wikitext": "wikitext-2-raw/wiki.test.raw",
}

# task -> (hub dataset, config, split) of the same set
HUB = {
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
}

HOW_TO_PROVIDE = ("give --data-dir DIR, set KVEXPORT_DATA=DIR, or 'pip install datasets' to fetch it once "
                  "from the Hugging Face hub into {cache}")


def user_cache() -> Path:
    """The per-user data cache, ``$KVEXPORT_CACHE/data``."""
    return cache_root() / "data"


def data_file(task: str, data_dir: str | Path | None = None) -> Path:
    """The path of ``task``'s file (see the module docstring for the order); fetches and converts
    the hub copy into the per-user cache when nothing else has it."""
    rel = FILES[task]
    chosen = data_dir or os.environ.get("KVEXPORT_DATA")
    if chosen:
        path = Path(chosen).expanduser() / rel
        if not path.is_file():
            origin = "--data-dir" if data_dir else "$KVEXPORT_DATA"
            raise KvxError(f"{task}: {path} not found (from {origin}); point it at a folder holding {rel}")
        return path
    path = user_cache() / rel
    if not path.is_file():
        fetch(task, path)
    return path


def fetch(task: str, path: Path) -> None:
    """Download ``task`` from the hub (:data:`HUB`) and write it to ``path`` in the offline format."""
    how = HOW_TO_PROVIDE.format(cache=user_cache())
    try:
        import datasets  # noqa: F401  (optional: only this path needs it)
    except ImportError:
        raise KvxError(f"{task}: no benchmark data here; {how}") from None
    repo, config, split = HUB[task]
    print(f"[{task}: fetching {repo}{f' ({config})' if config else ''} {split} from the Hugging Face hub "
          f"into {path}]", file=sys.stderr, flush=True)
    try:
        rows = hub_rows(repo, config, split)
    except Exception as err:  # offline, hub errors: one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KvxError(f"{task}: fetching {repo} failed ({reason}); {how}") from None
    write_text_atomic(path, CONVERT[task](rows))


def hub_rows(repo: str, config: str | None, split: str) -> Iterable[dict]:
    """Rows (dicts in the hub dataset's schema) of one split, through ``datasets``."""
    import datasets

    return datasets.load_dataset(repo, config, split=split)


def _clean_hellaswag(text: str) -> str:
    """lm-evaluation-harness's HellaSwag ``preprocess`` (what llama.cpp's text file applied)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ").strip()


def hellaswag_text(rows: Iterable[dict]) -> str:
    """``Rowan/hellaswag`` rows -> the 6-line text format."""
    lines = []
    for r in rows:
        lines += [_clean_hellaswag(f"{r['activity_label']}: {r['ctx']}"), str(r["label"]).strip()]
        lines += [_clean_hellaswag(e) for e in r["endings"]]
    return "\n".join(lines) + "\n"


def question_jsonl(rows: Iterable[dict]) -> str:
    """``allenai/ai2_arc`` / ``allenai/openbookqa`` rows -> ARC JSONL."""
    out = []
    for r in rows:
        stem = r["question"] if "question" in r else r["question_stem"]
        choices = [{"text": t, "label": lab} for t, lab in zip(r["choices"]["text"], r["choices"]["label"])]
        out.append(json.dumps({"id": r["id"], "question": {"stem": stem, "choices": choices},
                               "answerKey": r["answerKey"]}))
    return "\n".join(out) + "\n"


def wikitext_raw(rows: Iterable[dict]) -> str:
    """``Salesforce/wikitext`` rows -> the raw text."""
    return "".join(r["text"] for r in rows)


CONVERT = {"hellaswag": hellaswag_text, "arc_challenge": question_jsonl, "arc_easy": question_jsonl,
           "openbookqa": question_jsonl, "wikitext": wikitext_raw}
