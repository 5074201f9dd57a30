"""The command line on bad input: one line, exit code 2, no traceback; and the happy paths."""

import subprocess
import sys

import pytest


def kvx(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "kvexport.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("kvexport: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_alias():
    assert_one_line_error(
        kvx("generate", "--model", "smollm-999m", "--prompt", "x"), "unknown model 'smollm-999m'", "kvexport models"
    )


def test_missing_weights_names_alias_place_and_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KVEXPORT_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = kvx("generate", "--model", "smollm-360m", "--prompt", "x")
    assert_one_line_error(
        res, "smollm-360m", str(tmp_path), "huggingface-cli download HuggingFaceTB/SmolLM-360M", "--random-weights"
    )


def test_missing_and_corrupt_files(tmp_path):
    assert_one_line_error(kvx("generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x"), "not found")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    assert_one_line_error(kvx("generate", "--model", str(bad), "--prompt", "x"), "cannot read GGUF")
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    assert_one_line_error(kvx("generate", "--model", str(d), "--prompt", "x"), "'gpt2'", "Llama")
    (d / "config.json").write_text("{not json")
    assert_one_line_error(kvx("generate", "--model", str(d), "--prompt", "x"), "not valid JSON")


@pytest.mark.real
def test_bad_policy_and_too_long_prompt():
    assert_one_line_error(kvx("generate", "--prompt", "x", "--kv-policy", "static-5"), "invalid policy")
    assert_one_line_error(
        kvx("generate", "--prompt", "word " * 300, "--max-context", "128"), "exceed the cache's context of 128"
    )


def test_random_weights_alias_is_marked(tmp_path):
    res = kvx(
        "generate",
        "--model",
        "smollm2-135m",
        "--random-weights",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
        "--kv-policy",
        "static-4",
        "--max-context",
        "64",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert res.returncode == 0, res.stderr
    assert "random weights" in res.stderr
    assert '"random_weights": true' in (tmp_path / "r.json").read_text()


def test_models_lists_all_aliases():
    out = kvx("models").stdout
    for alias in ("smollm-135m", "smollm-360m-instruct", "smollm-1.7b", "smollm2-1.7b-instruct"):
        assert alias in out
    assert "embedded GGUF" in out or "kvexport cache" in out


@pytest.mark.real
@pytest.mark.parametrize("policy", ["fp16", "static-8", "static-4", "static-2", "random:4", "rule", "learned"])
def test_generate_every_policy_prints_text_and_stats(policy, hand_controller):
    spec = f"learned:{hand_controller}" if policy == "learned" else policy
    res = kvx(
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--kv-policy",
        spec,
        "--kv-window",
        "4",
        "--max-context",
        "256",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of France is") and len(res.stdout) > len("The capital of France is") + 3
    assert "avg bits/element" in res.stderr and "tok/s" in res.stderr


def test_build_defaults_pick_the_fast_program_and_say_so():
    import argparse

    from kvexport.cli import build_defaults

    a = argparse.Namespace(kv_policy=None, ops=None, weights=None, target="executorch")
    line = build_defaults(a, wants_learned=False, q4_codes=True)
    assert (a.kv_policy, a.ops, a.weights) == ("static-k4v2", "fused", "q4-q8")
    assert "--ops portable" in line and "learned" in line and "fp16" in line and "--weights fp32" in line
    a = argparse.Namespace(kv_policy=None, ops="portable", weights=None, target="executorch")
    build_defaults(a, wants_learned=False, q4_codes=True)  # a stock runtime has no kvexport::q8_linear
    assert a.weights == "q4-h8"
    a = argparse.Namespace(kv_policy=None, ops=None, weights=None, target="onnx")
    build_defaults(a, wants_learned=True, q4_codes=False)  # --kv-budget-bits asks for the controller
    assert (a.kv_policy, a.ops, a.weights) == ("learned", "fused", "fp32")
    a = argparse.Namespace(kv_policy=None, ops=None, weights=None, target="ort")
    line = build_defaults(a, wants_learned=False, q4_codes=True)  # ORT Mobile: a stock runtime, no library
    assert (a.ops, a.weights) == ("portable", "q4") and "for a stock runtime" in line
    a = argparse.Namespace(kv_policy="fp16", ops="portable", weights="fp32", target="executorch")
    assert build_defaults(a, wants_learned=True, q4_codes=True) is None
    assert (a.kv_policy, a.ops, a.weights) == ("fp16", "portable", "fp32")
