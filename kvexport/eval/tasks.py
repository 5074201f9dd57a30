"""Benchmark items: loaders for the data files (found by :mod:`kvexport.data`) and the prompt formats.

Every multiple-choice item becomes an :class:`MCItem` (context text, choice texts, gold index);
the scorer appends ``TARGET_DELIMITER + choice`` to the context, as lm-evaluation-harness does.

Prompt formats (zero-shot, lm-evaluation-harness v0.4 task configs):

* **hellaswag**  context = ``"{activity_label}: {ctx}"`` (line 1 of each 6-line item of llama.cpp's
  text format), continuations = ``" " + ending``. lm-eval builds the context as
  ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``; the text file does not keep the
  ctx_a/ctx_b split, so ctx_b keeps its original case (``"... on a roof. he"``, lm-eval: ``"He"``).
  The ``[title]``/``[header]``/``[step]`` clean-up of lm-eval's ``preprocess`` is already applied
  in the file (:mod:`kvexport.data`). This is the text llama.cpp's ``--hellaswag`` scores.
* **arc_easy / arc_challenge**  context = ``"Question: {stem}\\nAnswer:"``, continuations =
  ``" " + choice text``; labels A-E or 1-4 (gold = index of ``answerKey`` among the item's labels).
* **openbookqa**  context = ``"{question_stem}"`` (lm-eval's ``openbookqa`` task uses the bare stem,
  no ``Question:``/``Answer:`` wrapper), continuations = ``" " + choice text``. ``OBQA_FORMAT =
  "qa"`` switches to the ARC wrapper.

``acc`` picks the choice with the highest summed log-probability; ``acc_norm`` divides it by the
UTF-8 byte length of the choice text (without the delimiter; lm-eval divides by ``len(choice)``,
the same for ASCII).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvexport.data import FILES, data_file

TARGET_DELIMITER = " "
PROMPT_VERSION = "lm-eval-0shot-v1"  # bump when a prompt format changes (part of the resume key)
OBQA_FORMAT = "stem"  # "stem" (lm-eval) or "qa" ("Question: ...\nAnswer:")

MC_TASKS = ("hellaswag", "arc_challenge", "arc_easy", "openbookqa")
ALL_TASKS = MC_TASKS + ("wikitext",)
assert set(ALL_TASKS) == set(FILES)
LONG_TASKS = ("longppl", "passkey")  # kvexport.eval.longctx: long documents and the passkey probe

TASK_TITLES = {
    "hellaswag": "HellaSwag",
    "arc_challenge": "ARC-C",
    "arc_easy": "ARC-E",
    "openbookqa": "OBQA",
    "wikitext": "WikiText-2",
}


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: the scorer appends ``TARGET_DELIMITER + choices[i]`` to ``context``."""

    task: str
    idx: int  # position in the file (0-based): the resume key
    id: str
    context: str
    choices: tuple[str, ...]
    gold: int

    def continuations(self) -> list[str]:
        return [TARGET_DELIMITER + c for c in self.choices]


def load_hellaswag(path: Path) -> list[MCItem]:
    """llama.cpp's 6-line format: ``activity_label: ctx``, gold label 0-3, then the 4 endings."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    items = []
    for i in range(0, len(lines), 6):
        ctx, label, *endings = lines[i : i + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 2}: label {label!r} is not 0-3")
        items.append(
            MCItem("hellaswag", i // 6, str(i // 6), ctx.strip(), tuple(e.strip() for e in endings), int(label))
        )
    return items


def _question_items(task: str, path: Path, template: str) -> list[MCItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            doc = json.loads(line)
            q = doc["question"]
            labels = [c["label"] for c in q["choices"]]
            key = doc["answerKey"].strip()
            if key not in labels:
                raise ValueError(f"{path}:{n + 1}: answerKey {key!r} not among labels {labels}")
            items.append(
                MCItem(
                    task,
                    len(items),
                    doc["id"],
                    template.format(q=q["stem"].strip()),
                    tuple(c["text"] for c in q["choices"]),
                    labels.index(key),
                )
            )
    return items


def load_arc(path: Path, task: str = "arc_easy") -> list[MCItem]:
    """ARC JSONL (``question.stem``, ``question.choices[].{text,label}``, ``answerKey`` A-E or 1-4)."""
    return _question_items(task, path, "Question: {q}\nAnswer:")


def load_openbookqa(path: Path) -> list[MCItem]:
    """OpenBookQA ``Main`` JSONL (same schema as ARC, labels A-D)."""
    return _question_items("openbookqa", path, "{q}" if OBQA_FORMAT == "stem" else "Question: {q}\nAnswer:")


def load_task(task: str, data_dir: Path | None = None) -> list[MCItem]:
    """Items of a multiple-choice task, from ``data_dir`` or where :func:`kvexport.data.data_file`
    finds them."""
    if task not in MC_TASKS:
        raise ValueError(f"unknown multiple-choice task '{task}'; use one of {', '.join(MC_TASKS)}")
    path = data_file(task, data_dir)
    if task == "hellaswag":
        return load_hellaswag(path)
    if task in ("arc_easy", "arc_challenge"):
        return load_arc(path, task)
    return load_openbookqa(path)
