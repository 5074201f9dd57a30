"""Long-context evaluation (longppl + passkey) on the tiny model: per-token metrics, position bins, the probe's
construction, the CLI end to end (reports, resume, Ctrl-C) and one-line errors for bad input."""

import json
import random

import numpy as np
import pytest
import torch

import kvexport.options
from kvexport.errors import KvxError
from kvexport.eval import cli as eval_cli
from kvexport.eval import long_report as R
from kvexport.eval import passkey as P
from kvexport.eval.longctx import LongConfig, LongEvaluation, token_metrics
from kvexport.eval.records import RecordStore
from kvexport.eval.scoring import ReferenceScorer
from kvexport.kv.quant import bits_per_element
from kvexport.session import CacheOptions

WORDS = "river stone light among quiet northern village winter harbour market old bridge seven".split()


@pytest.fixture
def text_file(tmp_path):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(40)]
    path = tmp_path / "doc.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(out, *extra):
    p = eval_cli.argparse.ArgumentParser()
    eval_cli.add_arguments(p)
    return p.parse_args(["--out", str(out), "--no-progress", "--n-boot", "300", *extra])


LONG_ARGV = ["--tasks", "longppl,passkey", "--kv-policy", "static-2,static-8", "--long-contexts", "16,48",
             "--limit", "2", "--kv-window", "8", "--kv-sinks", "2", "--prefill-chunk", "4", "--probe-contexts", "96",
             "--probe-depths", "0.1,0.9", "--probe-trials", "2"]


def test_token_metrics_against_itself_and_by_hand():
    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(5, 7), -1)
    lp = torch.log_softmax(torch.randn(5, 7), -1)
    targets = torch.tensor([0, 3, 6, 2, 1])
    same = token_metrics(ref, ref, targets)
    assert same["kl"].abs().max() == 0 and bool(same["top1"].all())
    m = token_metrics(lp, ref, targets)
    want = (ref.exp() * (ref - lp)).sum(-1)
    assert torch.allclose(m["kl"], want) and bool((m["kl"] > 0).all())
    assert torch.equal(m["nll"], -lp[torch.arange(5), targets])
    assert torch.equal(m["top1"], lp.argmax(-1) == ref.argmax(-1))


def test_position_bins_and_block_estimates():
    assert R.position_bins(8192, [512, 2048, 8192], fine=False) == [(0, 512), (512, 2048), (2048, 8191)]
    fine = R.position_bins(2048, [512, 2048], fine=True)
    assert fine == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1024), (1024, 2047)]
    assert R.position_bins(48, [16, 48], fine=True) == [(0, 16), (16, 47)]
    values = np.arange(200, dtype=float)
    s, c = R._blocks([(values, values < 150)])
    assert list(c) == [64, 64, 22] and s.sum() == values[:150].sum()
    e = R.estimate([(values, np.ones(200, bool)), (values + 1, np.ones(200, bool))], n_boot=500, seed=0)
    assert e["value"] == pytest.approx(100.0) and e["tokens"] == 400 and e["ci"][0] < 100 < e["ci"][1]


def test_context_gain_pairs_the_same_tokens():
    s, ll = 4, 12
    stream = np.random.default_rng(0).random(24)  # per-token NLL with the s-windows, by absolute index
    small = {k: {"start": k * s, "nll": list(stream[k * s + 1 : (k + 1) * s])} for k in range(6)}
    large = {w: {"start": w * ll, "nll": list(stream[w * ll + 1 : (w + 1) * ll] - 0.5)} for w in range(2)}
    g = R.context_gain(small, large, s, n_boot=200, seed=0)
    # positions i >= 4 of each 12-window whose s-window position j = (target % 4) - 1 >= 2: targets 7, 11 (w 0)
    assert g["tokens"] == 4 and g["diff"] == pytest.approx(-0.5)


def test_passkey_items(real_model):
    tok = real_model.tokenizer
    n = 200
    items = [P.probe_item(tok, n, d, t, seed=3) for t in range(3) for d in (0.0, 0.5, 1.0)]
    for it in items:
        assert len(it.context) + len(it.continuations[0]) == n
        assert len({len(c) for c in it.continuations}) == 1 and len(it.continuations) == 1 + P.N_DISTRACTORS
        needle = tok.encode(P.NEEDLE.format(key=it.key))
        assert it.context[it.needle_at : it.needle_at + len(needle)] == needle
        assert it.key not in it.distractors and len(set(it.distractors)) == P.N_DISTRACTORS
    at = [it.needle_at for it in items[:3]]
    assert at[0] == len(tok.encode(P.INTRO)) and at[0] < at[1] < at[2]
    assert items[0].key == items[2].key != items[3].key  # one key per trial, at every depth
    assert P.probe_item(tok, n, 0.5, 1, seed=3) == items[4]  # seeded
    text = list(range(1000, 1400))
    it = P.probe_item(tok, n, 0.5, 0, seed=3, filler="text", text_ids=text)
    assert it.context[len(tok.encode(P.INTRO))] == 1000
    with pytest.raises(ValueError, match="at least"):
        P.probe_item(tok, 40, 0.5, 0, seed=3)
    assert P.item_scores([-1.0, -2.0, -3.0]) == {"acc": 1.0, "rank": 0, "answer_logprob": -1.0, "margin": 1.0}
    assert P.item_scores([-2.0, -2.0, -3.0])["acc"] == 0.0  # a tie counts against the answer


def test_longppl_and_passkey_end_to_end(tiny_model, tmp_path, monkeypatch, capsys, text_file):
    monkeypatch.setattr(kvexport.options, "load_model", lambda a: tiny_model)
    out = tmp_path / "run"
    argv = [*LONG_ARGV, "--text-file", str(text_file)]
    assert eval_cli.run(_args(out, *argv)) == 0
    stdout = capsys.readouterr().out
    for name in ("items.jsonl", "long_summary.json", "long_table.md", "longppl.png", "passkey.png"):
        assert (out / name).is_file(), name
    assert (out / "longppl.png").read_bytes()[:8] == (out / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "summary.json").exists()  # no benchmark task: no benchmark report
    summary = json.loads((out / "long_summary.json").read_text())
    assert summary["policies"] == ["fp16", "static-2", "static-8"]  # the reference is added
    lp = summary["longppl"]
    assert lp["windows"] == {"16": 6, "48": 2} and lp["tokens_per_context"] == {"16": 96, "48": 96}
    res = lp["results"]
    for c in ("16", "48"):
        fp, q2, q8 = res["fp16"][c], res["static-2"][c], res["static-8"][c]
        assert fp["kl"] == 0 and fp["dnll"] == 0 and fp["top1"] == 1 and fp["avg_bits"] == 16
        assert q2["kl"] > q8["kl"] > 0 and q2["kl_ci"][0] <= q2["kl"] <= q2["kl_ci"][1]
        assert fp["ppl_ci"][0] <= fp["ppl"] <= fp["ppl_ci"][1]
        assert q2["tokens"] == fp["tokens"] == (6 * 15 if c == "16" else 2 * 47)
        assert 16 > q8["avg_bits"] > q2["avg_bits"] > bits_per_element(2, 32)  # sinks + window at 16 bits
    assert res["static-2"]["48"]["avg_bits"] < res["static-2"]["16"]["avg_bits"]  # the window weighs less
    assert [(b["lo"], b["hi"]) for b in res["static-2"]["48"]["by_range"]] == [(0, 16), (16, 47)]
    assert sum(b["tokens"] for b in res["static-2"]["48"]["by_position"]) == 94
    assert {(g["policy"], g["small"], g["large"]) for g in lp["context_gain"]} == {
        (p, 16, 48) for p in ("fp16", "static-2", "static-8")
    }
    pair = next(r for r in lp["paired"] if r["context"] == 48)
    assert (pair["a"], pair["b"]) == ("static-2", "static-8") and pair["kl_diff"] > 0
    pk = summary["passkey"]
    assert pk["candidates"] == 10 and pk["contexts"] == [96]
    for p in ("fp16", "static-2", "static-8"):
        assert set(pk["results"][p]["96"]) == {"0.1", "0.9"}
        assert all(r["trials"] == 2 and 0 <= r["acc"] <= 1 for r in pk["results"][p]["96"].values())
    assert {(r["policy"], r["depth"]) for r in pk["paired"]} == {(p, d) for p in ("static-2", "static-8")
                                                                 for d in (0.1, 0.9)}
    table = (out / "long_table.md").read_text()
    for heading in ("Per context length", "FP16 loss by query position", "Context gain", "ΔNLL and KL by query",
                    "Paired comparisons", "Passkey retrieval probe"):
        assert heading in table
    assert table in stdout
    recs = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(recs) == 3 * (6 + 2) + 3 * 2 * 2  # policies x windows + policies x depths x trials
    win = next(r for r in recs if r["task"] == "longppl" and r["policy"] == "static-2" and r["context"] == 48)
    assert len(win["nll"]) == len(win["kl"]) == len(win["top1"]) == 47

    before = (out / "items.jsonl").read_text()
    assert eval_cli.run(_args(out, *argv)) == 0  # all recorded: nothing rescored, the same numbers
    assert (out / "items.jsonl").read_text() == before
    assert json.loads((out / "long_summary.json").read_text())["longppl"] == lp


def test_ctrl_c_then_rerun_resumes(tiny_model, tmp_path, monkeypatch, text_file):
    monkeypatch.setattr(kvexport.options, "load_model", lambda a: tiny_model)
    orig = ReferenceScorer.token_logprobs
    calls = {"n": 0}

    def flaky(self, ids):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return orig(self, ids)

    monkeypatch.setattr(ReferenceScorer, "token_logprobs", flaky)
    out = tmp_path / "run"
    argv = ["--tasks", "longppl", "--kv-policy", "fp16,static-4", "--long-contexts", "32", "--limit", "2",
            "--kv-window", "4", "--kv-sinks", "2", "--text-file", str(text_file)]
    with pytest.raises(KeyboardInterrupt):
        eval_cli.run(_args(out, *argv))
    assert len((out / "items.jsonl").read_text().splitlines()) == 3  # window 0, and fp16 of window 1
    assert json.loads((out / "long_summary.json").read_text())["longppl"]["results"]["static-4"]["32"]["windows"] == 1
    calls["n"] = 100
    assert eval_cli.run(_args(out, *argv)) == 0
    assert calls["n"] == 102  # window 1 only: fp16 + static-4
    assert len((out / "items.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text-file", "{tmp}/missing.txt"], "--text-file .*missing.txt not found"),
        (["--long-contexts", "8192"], "--long-contexts 8192 exceeds the model's 4096 positions"),
        (["--long-contexts", "4000"], "the text has .* tokens, fewer than the 4,000-token context"),
        (["--tasks", "passkey", "--probe-contexts", "40"], "--probe-contexts 40: a passkey item needs at least"),
        (["--backend", "onnx", "--program", "graphs/x"], "run on the reference backend only"),
        (["--long-contexts", "1"], "at least 2 tokens per context"),
    ],
)
def test_bad_input_is_one_line(tiny_model, tmp_path, monkeypatch, text_file, extra, message):
    monkeypatch.setattr(kvexport.options, "load_model", lambda a: tiny_model)
    argv = ["--tasks", "longppl", "--long-contexts", "16", "--kv-window", "4", "--kv-sinks", "2",
            "--text-file", str(text_file)]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    with pytest.raises(KvxError, match=message) as err:
        eval_cli.run(_args(tmp_path / "run", *argv, *extra))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "items.jsonl").exists()


@pytest.mark.real
def test_real_model_short_long_context(real_model, tmp_path):
    """Real SmolLM2 at 256 tokens: FP16 finds a passkey planted mid-context, KL orders 2 > 4 bits > FP16 = 0."""
    cfg = LongConfig(policies=["static-4", "static-2"], tasks=["longppl", "passkey"], opts=CacheOptions(),
                     contexts=[256], depths=[0.5], trials=1, limit=1, progress=False)
    ev = LongEvaluation(real_model, cfg)
    with RecordStore(tmp_path / "items.jsonl") as store:
        ev.execute(store)
        summary = R.summarize(ev, store, n_boot=200)
    res = summary["longppl"]["results"]
    assert res["fp16"]["256"]["kl"] == 0 and res["static-2"]["256"]["kl"] > res["static-4"]["256"]["kl"] > 0
    assert res["fp16"]["256"]["ppl"] < 100
    assert summary["passkey"]["results"]["fp16"]["256"]["0.5"]["acc"] == 1
