"""Loaders parse the real benchmark copies ($KVEXPORT_DATA, set by conftest): counts, labels, prompt formats."""

import os
from collections import Counter
from pathlib import Path

import pytest

from kvexport.data import FILES
from kvexport.errors import KvxError
from kvexport.eval import tasks as T

DATA = Path(os.environ["KVEXPORT_DATA"])


def test_hellaswag_counts_labels_and_format():
    items = T.load_task("hellaswag", DATA)
    assert len(items) == 10_042
    assert Counter(i.gold for i in items) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    assert all(len(i.choices) == 4 and all(i.choices) and i.context for i in items)
    first = items[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. he"
    assert first.gold == 3 and first.choices[3] == "starts pulling up roofing on a roof."
    assert first.continuations()[0] == " is using wrap to wrap a pair of skis."
    assert [i.idx for i in items[:3]] == [0, 1, 2]


@pytest.mark.parametrize("task,n,n_numeric", [("arc_easy", 2376, 97), ("arc_challenge", 1172, 22)])
def test_arc_counts_and_labels(task, n, n_numeric):
    items = T.load_task(task, DATA)
    assert len(items) == n
    assert len({i.id for i in items}) == n
    assert all(0 <= i.gold < len(i.choices) for i in items)
    assert {len(i.choices) for i in items} == {3, 4, 5}
    assert all(i.context.startswith("Question: ") and i.context.endswith("\nAnswer:") for i in items)
    # numeric-labelled (NY Regents) items: gold is the position of answerKey among "1".."4"
    raw = [l for l in (DATA / FILES[task]).read_text().splitlines() if '"label":"1"' in l]
    assert len(raw) == n_numeric


def test_arc_numeric_answer_key_maps_to_position(tmp_path):
    f = tmp_path / "arc.jsonl"
    f.write_text('{"id":"x","question":{"stem":" Why? ","choices":[{"text":"a","label":"1"},{"text":"b","label":"2"},'
                 '{"text":"c","label":"3"}]},"answerKey":"3"}\n')
    (item,) = T.load_arc(f, "arc_easy")
    assert item.gold == 2 and item.context == "Question: Why?\nAnswer:" and item.choices == ("a", "b", "c")


def test_arc_bad_answer_key_is_an_error(tmp_path):
    f = tmp_path / "arc.jsonl"
    f.write_text('{"id":"x","question":{"stem":"q","choices":[{"text":"a","label":"A"}]},"answerKey":"B"}\n')
    with pytest.raises(ValueError, match="answerKey"):
        T.load_arc(f)


def test_openbookqa_counts_and_format():
    items = T.load_task("openbookqa", DATA)
    assert len(items) == 500
    assert Counter("ABCD"[i.gold] for i in items) == {"A": 138, "B": 126, "C": 132, "D": 104}
    assert all(len(i.choices) == 4 for i in items)
    assert items[0].id == "8-343" and items[0].context.startswith("A person wants to start saving money")
    assert not items[0].context.startswith("Question:")  # lm-eval's openbookqa: the bare stem


def test_hellaswag_rejects_a_truncated_file(tmp_path):
    f = tmp_path / "h.txt"
    f.write_text("ctx\n1\na\nb\nc\n")
    with pytest.raises(ValueError, match="multiple of 6"):
        T.load_hellaswag(f)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(KvxError, match=str(tmp_path)):
        T.load_task("arc_easy", tmp_path)
