"""``kvexport bench --peers`` on the tiny random Llama: peers built once into program directories that
open through ``open_runner``, their logits checked against our fp32 reference, a peer that cannot run
here reported with its reason, and the bench report (JSON, markdown, PNG, peak RSS)."""

import json

import numpy as np
import pytest
import torch

from kvexport.baselines.peers import ensure_peers, parse_peers
from kvexport.bench import format_table, markdown, run_bench, write_report
from kvexport.errors import KvxError
from kvexport.export.manifest import read_manifest
from kvexport.export.runners import open_runner
from kvexport.session import CacheOptions, Session

MAX_CONTEXT = 48
NAMES = ["etllama-fp32-int8kv", "ortgenai-fp32", "ortgenai-int4", "llamacpp"]
PROMPT = [1000, 2000, 3000, 4000, 5000, 6000, 7000]


@pytest.fixture(scope="module")
def peers(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    return out, ensure_peers(tiny_model, NAMES, MAX_CONTEXT, out, gguf=None, log=lambda m: None)


def _rel(a, b: torch.Tensor) -> float:
    """``a``: a runner's logits (numpy), ``b``: the reference's."""
    return ((torch.from_numpy(a) - b).abs().max() / b.abs().max()).item()


def _against_reference(runner, tiny_model, steps=4) -> list[float]:
    """Relative max error of the runner's logits against the fp32 reference, prefill then greedy steps."""
    ref = Session(tiny_model, CacheOptions(policy="fp32", max_context=MAX_CONTEXT))
    got, want = runner.prefill(PROMPT), ref.step(PROMPT)[-1]
    errors = [_rel(got, want)]
    for _ in range(steps):
        nxt = int(want.argmax())
        got, want = runner.step([nxt]), ref.step([nxt])[-1]
        errors.append(_rel(got, want))
    return errors


def test_each_peer_is_built_or_says_why_not(peers, tiny_model):
    out, built = peers
    assert [name for name, _, _ in built] == NAMES
    paths = {name: path for name, path, _ in built}
    assert all(paths[n] is not None for n in NAMES[:3])
    (_, path, why), = [b for b in built if b[0] == "llamacpp"]
    assert path is None and ("not installed" in why or "was not loaded from one" in why), why
    again = ensure_peers(tiny_model, NAMES[:2], MAX_CONTEXT, out, log=lambda m: pytest.fail(f"rebuilt: {m}"))
    assert [p for _, p, _ in again] == [paths[n] for n in NAMES[:2]]  # cached: same weights, same context


def test_ortgenai_fp32_matches_the_reference_and_int4_runs(peers, tiny_model):
    paths = {name: path for name, path, _ in peers[1]}
    m = read_manifest(paths["ortgenai-fp32"])
    assert m["target"] == "ort-genai" and m["policy"]["spec"] == "fp32-kv (onnxruntime-genai)"
    a = tiny_model.args
    assert m["cache"]["kv_bytes_per_token"] == 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4
    runner = open_runner(paths["ortgenai-fp32"])
    assert max(_against_reference(runner, tiny_model)) < 1e-4  # measured ~2e-6
    stats = runner.last_stats
    assert stats[1] == m["cache"]["kv_bytes_per_token"] * runner.pos and stats[2] == 32.0
    runner.reset()
    assert runner.pos == 0 and _rel(runner.prefill(PROMPT), Session(
        tiny_model, CacheOptions(policy="fp32", max_context=MAX_CONTEXT)).step(PROMPT)[-1]) < 1e-4
    int4 = open_runner(paths["ortgenai-int4"])
    assert read_manifest(paths["ortgenai-int4"])["weights"] == "int4"
    assert np.isfinite(int4.prefill(PROMPT)).all()


def test_export_llama_int8_kv_cache(peers, tiny_model):
    path = {name: p for name, p, _ in peers[1]}["etllama-fp32-int8kv"]
    m = read_manifest(path)
    assert "--quantize_kv_cache" in m["export_command"] and m["ops_mode"] == "export_llama-int8kv"
    a = tiny_model.args
    assert m["cache"]["kv_bytes_per_token"] == 2 * a.n_layers * a.n_kv_heads * (a.head_dim + 5)
    runner = open_runner(path)
    errors = _against_reference(runner, tiny_model)
    assert max(errors) < 0.1, errors  # int8 keys and values, the prompt's too (measured ~0.04)
    assert runner.last_stats[2] == pytest.approx(8 * (a.head_dim + 5) / a.head_dim)


def test_bench_report_with_peers_and_an_unavailable_one(peers, tmp_path):
    built = [(n, p) for n, p, _ in peers[1] if p is not None][:2]
    missing = [(n, why) for n, p, why in peers[1] if p is None]
    result = run_bench([p for _, p in built], contexts=[8, 16], decode_steps=4, repeats=2, rss=True,
                       unavailable=missing)
    rows = result["rows"]
    assert [r["context"] for r in rows] == [8, 8, 16, 16] and result["repeats"] == 2
    assert all(r["decode_ms_min"] <= r["decode_ms_per_token"] <= r["decode_ms_p90"] for r in rows)
    assert all(r["program_bytes"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    assert rows[0]["kernel_calls"] > 0 and rows[1]["kernel_calls"] is None  # .pte vs ONNX
    top = [r for r in rows if r["context"] == 16]
    rss = [{k: v for k, v in r.items() if "rss" in k} for r in top]
    assert all(r.get("peak_rss_mb", 0) > r.get("import_rss_mb", 1e9) > 50 for r in rss), rss
    assert all("peak_rss_mb" not in r for r in rows if r["context"] == 8)
    text = format_table(result)
    assert "not run: " in text and "llamacpp" in text
    paths = write_report(result, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["unavailable"][0]["program"] == "llamacpp"
    md = markdown(result)
    assert "| `llamacpp` | not run:" in md and md.count("\n| `tiny-random-peer-") == 2
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_peer_names_are_checked():
    assert parse_peers("all")[0] == "etllama-fp32" and parse_peers("llamacpp, ortgenai-int4") == [
        "llamacpp", "ortgenai-int4"]
    with pytest.raises(KvxError, match="unknown peer 'etllama-int2'"):
        parse_peers("etllama-fp32,etllama-int2")


@pytest.mark.real
def test_llamacpp_runs_the_embedded_gguf_like_the_reference(real_model, tmp_path):
    """llama.cpp on the GGUF our weights come from (Q4_1 linears, Q8_0 table; its matmuls quantize
    activations to 8 bits): the next-token distribution after a prompt within KL 0.05 of our fp32
    reference (measured 0.004 with the f16 cache, 0.006 with q8_0)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the 'peers' extra)")
    from kvexport.models.loader import embedded_gguf

    built = ensure_peers(real_model, ["llamacpp", "llamacpp-q8kv"], 64, tmp_path, gguf=embedded_gguf(),
                         log=lambda m: None)
    prompt = real_model.tokenizer.encode("The three largest cities in Germany are")
    want = torch.log_softmax(Session(real_model, CacheOptions(policy="fp32", max_context=64)).step(prompt)[-1], -1)
    for name, path, why in built:
        assert path is not None, why
        got = torch.log_softmax(torch.from_numpy(open_runner(path).prefill(prompt)), -1)
        assert (want.exp() * (want - got)).sum() < 0.05, name


def test_cli_bench_peers(peers, tmp_path, capsys):
    """``kvexport bench --peers`` from the command line: the peer named first is the baseline; a program of other
    weights is refused in one line; a peer that cannot run is a 'not run' row; the report is written."""
    from kvexport.cli import main

    ours = {name: p for name, p, _ in peers[1]}["ortgenai-fp32"]  # built from the tiny model, not --model
    common = ["--model", "smollm2-135m", "--random-weights", "--contexts", "8", "--decode-steps", "2",
              "--repeats", "1", "--out", str(tmp_path / "graphs")]
    assert main(["bench", str(ours), "--peers", "ortgenai-fp32", *common]) == 2
    assert "was built from tiny-random, not from --model smollm2-135m" in capsys.readouterr().err
    assert main(["bench", "--peers", "ortgenai-fp32,llamacpp", *common, "--report", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-random-peer-ortgenai-fp32-ctx10" in out and "llamacpp" in out and "not run: " in out
    result = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert result["threads"] == 2 and [r["context"] for r in result["rows"]] == [8]
    assert result["rows"][0]["peak_rss_mb"] > 0  # --peers measures memory
