"""Runs on the tiny model: resume, Ctrl-C, end-to-end JSON/markdown/PNG; one small real-model check."""

import json
import os
from pathlib import Path

import pytest

import kvexport.options
from kvexport.eval import cli as eval_cli
from kvexport.eval.records import RecordStore
from kvexport.eval.runner import EvalConfig, Evaluation
from kvexport.eval.scoring import ReferenceScorer
from kvexport.kv.quant import bits_per_element
from kvexport.session import CacheOptions

DATA = Path(os.environ["KVEXPORT_DATA"])


class Counting:
    calls = 0


@pytest.fixture
def count_scores(monkeypatch):
    orig = ReferenceScorer.score

    def score(self, ctx, conts):
        Counting.calls += 1
        return orig(self, ctx, conts)

    Counting.calls = 0
    monkeypatch.setattr(ReferenceScorer, "score", score)
    return Counting


def _cfg(limit, window=8, policies=("fp16", "static-2"), tasks=("arc_easy",)):
    return EvalConfig(
        policies=list(policies),
        tasks=list(tasks),
        opts=CacheOptions(window=window, sinks=2, max_context=512),
        limit=limit,
        data_dir=DATA,
        progress=False,
    )


def test_resume_skips_recorded_items(tiny_model, tmp_path, count_scores):
    path = tmp_path / "items.jsonl"
    with RecordStore(path) as store:
        ev = Evaluation(tiny_model, _cfg(3))
        assert ev.pending(store) == {"arc_easy": 6}
        ev.execute(store)
    assert count_scores.calls == 6
    first = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(first) == 6 and {r["idx"] for r in first} == {0, 1, 2}

    with RecordStore(path) as store:  # same configuration, more items: only the new ones run
        ev = Evaluation(tiny_model, _cfg(5))
        assert ev.pending(store) == {"arc_easy": 4}
        ev.execute(store)
    assert count_scores.calls == 6 + 4
    lines = path.read_text().splitlines()
    assert len(lines) == 10 and [json.loads(l) for l in lines[:6]] == first

    with RecordStore(path) as store:  # another window is another configuration: nothing reused
        assert Evaluation(tiny_model, _cfg(5, window=4)).pending(store) == {"arc_easy": 10}


def test_truncated_last_line_is_skipped_and_appends_start_fresh(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"key":"k","task":"t","idx":0}\n{"key":"k","task":"t","id')
    store = RecordStore(path)
    assert store.bad_lines == 1 and store.has("k", "t", 0) and not store.has("k", "t", 1)
    store.append({"key": "k", "task": "t", "idx": 1})
    store.close()
    again = RecordStore(path)
    assert again.has("k", "t", 1) and again.bad_lines == 1


def _args(out, *extra):
    p = eval_cli.argparse.ArgumentParser()
    eval_cli.add_arguments(p)
    return p.parse_args(["--out", str(out), "--no-progress", "--n-boot", "500", *extra])


def test_end_to_end_tiny_model(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kvexport.options, "load_model", lambda a: tiny_model)
    out = tmp_path / "run"
    argv = [
        "--tasks",
        "hellaswag,arc_challenge,arc_easy,openbookqa,wikitext",
        "--limit",
        "3",
        "--ppl-window",
        "48",
        "--kv-policy",
        "fp16,static-2,random:0.25,0.25,0.25,0.25",
        "--kv-window",
        "0",
        "--kv-sinks",
        "0",
        "--prefill-chunk",
        "8",
        "--max-context",
        "512",
    ]
    assert eval_cli.run(_args(out, *argv)) == 0
    stdout = capsys.readouterr().out
    for name in ("items.jsonl", "summary.json", "table.md", "acc_vs_bits.png"):
        assert (out / name).is_file(), name
    assert (out / "acc_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "items.jsonl").read_text().splitlines()
    assert len(lines) == 3 * (4 * 3 + 3)  # policies x (4 MC tasks x 3 items + 3 WikiText windows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample"] and summary["settings"]["window"] == 0 and summary["settings"]["prefill_chunk"] == 8
    assert summary["tasks"]["hellaswag"] == {"n_total": 10042, "n": 3}
    res = summary["results"]
    assert set(res) == {"fp16", "static-2", "random:0.25,0.25,0.25,0.25"}
    hs = res["static-2"]["hellaswag"]
    assert (
        hs["n"] == 3
        and hs["avg_bits"] == pytest.approx(bits_per_element(2, 32))
        and hs["acc_norm_ci"][0] <= hs["acc_norm"] <= hs["acc_norm_ci"][1]
    )
    assert res["fp16"]["hellaswag"]["avg_bits"] == 16.0
    assert 2.5 < res["random:0.25,0.25,0.25,0.25"]["overall"]["avg_bits"] < 16
    assert res["fp16"]["wikitext"]["kl"] == 0.0 and res["static-2"]["wikitext"]["kl"] > 0
    assert res["static-2"]["wikitext"]["ppl"] != res["fp16"]["wikitext"]["ppl"]
    recs = [json.loads(l) for l in lines]
    acc = [r["acc"] for r in recs if r["policy"] == "static-2" and r["task"] == "arc_easy"]
    assert res["static-2"]["arc_easy"]["acc"] == pytest.approx(sum(acc) / 3)
    assert set(summary["paired"]) == {"static-2", "random:0.25,0.25,0.25,0.25"}
    table = (out / "table.md").read_text()
    assert (
        "Subset, not the full benchmarks" in table
        and "| `static-2` |" in table
        and "HellaSwag acc_norm" in table
        and "WikiText-2 ppl" in table
    )
    assert table in stdout

    before = (out / "items.jsonl").read_text()
    assert eval_cli.run(_args(out, *argv)) == 0  # everything recorded: nothing rescored, same numbers
    assert (out / "items.jsonl").read_text() == before
    again = json.loads((out / "summary.json").read_text())
    assert again["results"] == summary["results"] and again["paired"] == summary["paired"]


def test_ctrl_c_leaves_a_resumable_state(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(kvexport.options, "load_model", lambda a: tiny_model)
    orig = ReferenceScorer.score
    calls = {"n": 0}

    def flaky(self, ctx, conts):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return orig(self, ctx, conts)

    monkeypatch.setattr(ReferenceScorer, "score", flaky)
    out = tmp_path / "run"
    argv = [
        "--tasks",
        "openbookqa",
        "--limit",
        "3",
        "--kv-policy",
        "fp16,static-4",
        "--max-context",
        "256",
        "--batch-items",
        "1",
    ]  # the cache path: one score() call per item
    with pytest.raises(KeyboardInterrupt):
        eval_cli.run(_args(out, *argv))
    assert len((out / "items.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "summary.json").read_text())["results"]["static-4"]["openbookqa"]["n"] == 1
    calls["n"] = 100
    assert eval_cli.run(_args(out, *argv)) == 0
    assert calls["n"] == 102  # only the 2 missing items ran
    assert len((out / "items.jsonl").read_text().splitlines()) == 6


@pytest.mark.real
def test_real_model_arc_easy_protocol(real_model):
    """Real SmolLM2: fp16 scores equal full-sequence log-probs; 2-bit KV at window 0 changes them."""
    cfg = EvalConfig(
        policies=["fp16", "static-2"],
        tasks=["arc_easy"],
        limit=1,
        data_dir=DATA,
        progress=False,
        opts=CacheOptions(window=0, sinks=0, max_context=256),
        prefill_chunk=8,
    )
    ev = Evaluation(real_model, cfg)
    fp, q2 = ev.runs[0].scorer, ev.runs[1].scorer
    ctx, conts = ev.toks["arc_easy"][0]
    a, b = fp.score(ctx, conts), q2.score(ctx, conts)
    full = fp.token_logprobs(ctx + conts[0])
    want = sum(full[len(ctx) - 1 + i, t].item() for i, t in enumerate(conts[0]))
    assert a[0] == pytest.approx(want, abs=2e-2)
    assert q2.kv_stats()["avg_bits"] == pytest.approx(2.5)
    assert max(abs(x - y) for x, y in zip(a, b)) > 0.05


def test_sample_is_a_fixed_seeded_subset_in_file_order():
    from kvexport.eval.runner import load_items

    def pick(seed):
        cfg = EvalConfig(
            policies=["fp16"], tasks=["openbookqa"], opts=CacheOptions(), sample=50, sample_seed=seed, data_dir=DATA
        )
        return [it.idx for it in load_items(cfg)[0]["openbookqa"]]

    first = pick(0)
    assert len(first) == 50 == len(set(first)) and first == sorted(first) and first == pick(0)
    assert first != pick(1) and first != list(range(50))
