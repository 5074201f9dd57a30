"""Where benchmark data comes from: --data-dir > $KVEXPORT_DATA > per-user cache > hub (a local stand-in)."""

import os
import sys
import types

import pytest

from kvexport import data
from kvexport.errors import KvxError
from kvexport.eval import tasks as T

# The first HellaSwag validation item and an OpenBookQA item as the hub datasets hold them.
HELLASWAG_ROW = {"activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he", "label": "3",
                 "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}
WIKIHOW_ROW = {"activity_label": "Home and Garden", "label": "0",
               "ctx": "[header] How to grow tulips [title] Pick a sunny spot. [step] Tulips", "endings": [
                   "need  light.", "[substeps] grow in shade.", "are red.", "are blue."]}
OBQA_ROW = {"id": "8-343", "question_stem": "A person wants to", "answerKey": "B",
            "choices": {"text": ["make calls", "quit eating lunch out", "buy less", "sell"], "label": list("ABCD")}}


@pytest.fixture
def no_user_data(tmp_path, monkeypatch):
    """No --data-dir, no $KVEXPORT_DATA, an empty per-user cache under tmp_path."""
    monkeypatch.delenv("KVEXPORT_DATA", raising=False)
    monkeypatch.setenv("KVEXPORT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_data_dir_wins_over_the_environment_and_a_missing_file_is_named(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    (mine / "openbookqa").mkdir(parents=True)
    (mine / "openbookqa" / "test.jsonl").write_text("")
    monkeypatch.setenv("KVEXPORT_DATA", str(tmp_path / "elsewhere"))
    assert data.data_file("openbookqa", mine) == mine / "openbookqa" / "test.jsonl"
    with pytest.raises(KvxError, match=r"KVEXPORT_DATA.*arc/ARC-Easy-Test.jsonl"):
        data.data_file("arc_easy")
    with pytest.raises(KvxError, match=r"--data-dir"):
        data.data_file("arc_easy", mine)


def test_without_data_the_error_names_the_three_ways(no_user_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: import fails
    with pytest.raises(KvxError) as err:
        T.load_task("hellaswag")
    msg = str(err.value)
    assert "--data-dir" in msg and "KVEXPORT_DATA" in msg and "pip install datasets" in msg and "\n" not in msg


def test_hub_copy_is_converted_once_into_the_user_cache(no_user_data, monkeypatch):
    fetched = []

    def stand_in(repo, config, split):  # the hub, as datasets.load_dataset would return it (rows as dicts)
        fetched.append((repo, config, split))
        return {"Rowan/hellaswag": [HELLASWAG_ROW, WIKIHOW_ROW], "allenai/openbookqa": [OBQA_ROW]}[repo]

    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    monkeypatch.setattr(data, "hub_rows", stand_in)
    items = T.load_task("hellaswag")
    assert fetched == [("Rowan/hellaswag", None, "validation")]
    assert (no_user_data / "hellaswag" / "hellaswag_val_full.txt").is_file()
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. he" and items[0].gold == 3
    assert items[0].choices[3] == "starts pulling up roofing on a roof."
    # lm-eval's clean-up, as in llama.cpp's text file
    assert items[1].context == "Home and Garden: How to grow tulips. Pick a sunny spot. Tulips"
    assert items[1].choices[:2] == ("need light.", "grow in shade.")
    assert T.load_task("hellaswag") == items and len(fetched) == 1  # read from the cache now
    obqa = T.load_task("openbookqa")
    assert obqa[0].context == "A person wants to" and obqa[0].gold == 1
    assert obqa[0].choices[1] == "quit eating lunch out"


def test_a_failing_hub_is_one_line(no_user_data, monkeypatch):
    def offline(repo, config, split):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    monkeypatch.setattr(data, "hub_rows", offline)
    with pytest.raises(KvxError, match=r"fetching allenai/ai2_arc failed \(Couldn't reach") as err:
        T.load_task("arc_challenge")
    assert "\n" not in str(err.value) and not (no_user_data / data.FILES["arc_challenge"]).exists()


def test_eval_without_data_is_one_line_naming_the_ways(tmp_path, monkeypatch):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "KVEXPORT_DATA"}
    env.update(KVEXPORT_CACHE=str(tmp_path / "cache"), PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules['datasets'] = None; "
                          "from kvexport.cli import main; sys.exit(main())", "eval", "--tasks", "hellaswag",
                          "--random-weights", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("kvexport: error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "--data-dir" in errors[0] and "KVEXPORT_DATA" in errors[0] and "datasets" in errors[0]
