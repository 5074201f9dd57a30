"""Hostile and careless input (issue #14): every mistake is one line and exit code 2 (or works),
nothing outside the target is removed, nothing half-written is left, no silent wrong answers.

One test (or parametrized family) per class of the issue, then the corruption test: truncated,
empty and random bytes into every file reader. In-process ``main([...])`` where that is faithful;
a subprocess where the process itself may die (the ExecuTorch / ONNX runtimes on corrupt
programs) or a signal is sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvexport.cli import main
from kvexport.errors import KvxError
from kvexport.export.build import build, default_name, replaceable_program
from kvexport.export.runners import open_runner
from kvexport.fsutil import atomic_directory
from kvexport.session import CacheOptions, build_cache

OPTS = CacheOptions(policy="static-4", max_context=64, window=4, sinks=2)


def cli(capsys, *args) -> tuple[int, str]:
    """``kvexport ARGS`` in process: (exit code, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse errors
        rc = exit_.code
    return rc, capsys.readouterr().err


def kvx(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvexport.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("kvexport: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for needle in needles:
        assert needle in lines[0], lines[0]


def set_hash(program: Path, name: str) -> None:
    """Record ``name``'s current SHA-256 in the manifest (a hash that matches corrupt bytes)."""
    m = json.loads((program / "manifest.json").read_text())
    m["program_files"][name] = hashlib.sha256((program / name).read_bytes()).hexdigest()
    (program / "manifest.json").write_text(json.dumps(m))


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def pte_program(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs") / "tiny-pte"
    return build(tiny_model, OPTS, "executorch", "portable", "fp32", out, log=lambda m: None)


@pytest.fixture(scope="module")
def onnx_program(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs") / "tiny-onnx"
    return build(tiny_model, OPTS, "onnx", "fused", "fp32", out, log=lambda m: None)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny random Llama as a Hugging Face model directory."""
    d = tmp_path_factory.mktemp("models") / "tiny-dir"
    d.mkdir()
    a = tiny_model.args
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
              "intermediate_size": a.intermediate_size, "vocab_size": a.vocab_size, "rope_theta": a.rope_theta,
              "rms_norm_eps": a.norm_eps, "max_position_embeddings": a.max_position, "tie_word_embeddings": True}
    (d / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in tiny_model.state_dict.items() if k != "lm_head.weight"}
    save_file(state, str(d / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model.tokenizer.directory / f, d / f)
    return d


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- 1. never delete what build did not create

@pytest.mark.parametrize("name", [".", "..", "../x", "a/b", ".hidden", "/tmp/x", ""])
def test_build_refuses_names_that_are_paths(capsys, name):
    rc, err = cli(capsys, "build", "--model", "smollm2-135m", "--random-weights", "--name", name)
    assert_one_line(rc, err, "argument --name", "not a plain name")


def test_build_replaces_only_its_own_programs(tiny_model, tmp_path, capsys, monkeypatch):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    with pytest.raises(KvxError, match="not something kvexport may replace"):
        build(tiny_model, OPTS, "executorch", "portable", "fp32", keep, log=lambda m: None)
    monkeypatch.chdir(tmp_path)  # --out . --name keep: the CLI refuses too, before any export
    rc, err = cli(capsys, "build", "--model", "smollm2-135m", "--random-weights", "--max-context", "64",
                  "--kv-policy", "static-4", "--out", ".", "--name", "keep")
    assert_one_line(rc, err, "keep exists and is not something kvexport may replace")
    assert (keep / "precious.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["keep"]


def test_atomic_swap_of_programs(tmp_path):
    identity = {"model": ["m", {}], "cache_options": {"window": 4}, "max_context": 64, "target": "executorch",
                "ops_mode": "portable", "weights": "fp32"}
    target = tmp_path / "prog"
    target.mkdir()
    (target / "manifest.json").write_text(json.dumps({"format": "kvexport-program", "model": {"name": "m"},
                                                      "cache_options": {"window": 8}, "target": "executorch"}))
    with pytest.raises(KvxError, match="built with other options.*--force"):
        with atomic_directory(target, replaceable_program(identity, force=False)) as tmp:
            (tmp / "new").write_text("x")
    assert (target / "manifest.json").is_file() and not (target / "new").exists()
    with atomic_directory(target, replaceable_program(identity, force=True)) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(os.listdir(target)) == ["new"] and sorted(os.listdir(tmp_path)) == ["prog"]  # old one gone too


# ---------------------------------------------------------------- 2. files a program depends on are verified

def test_swapped_tokenizer_ids_are_refused(pte_program, tmp_path, capsys):
    prog = copy(pte_program, tmp_path / "p")
    tok = json.loads((prog / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "ĠParis", "ĠLondon"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (prog / "tokenizer.json").write_text(json.dumps(tok))
    rc, err = cli(capsys, "run", prog, "--prompt", "The capital of France is", "--max-new-tokens", "2")
    assert_one_line(rc, err, "tokenizer.json does not match its manifest")


@pytest.mark.parametrize("fixture", ["pte_program", "onnx_program"])
def test_manifest_context_must_match_the_program(request, fixture, tmp_path, capsys):
    prog = copy(request.getfixturevalue(fixture), tmp_path / "p")
    m = json.loads((prog / "manifest.json").read_text())
    m["cache"]["max_context"] = m["metadata"]["get_max_context_len"] = 1216
    (prog / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KvxError, match="get_max_context_len=1216 but the program says 64"):
        open_runner(prog)
    rc, err = cli(capsys, "run", prog, "--prompt", "word " * 100)
    assert_one_line(rc, err, "get_max_context_len=1216")


# ---------------------------------------------------------------- 3. corrupt programs never reach the runtime

@pytest.mark.parametrize("command", ["run", "bundle"])
def test_random_program_bytes_with_a_matching_hash(pte_program, tmp_path, command):
    prog = copy(pte_program, tmp_path / "p")
    pte = prog / "model.pte"
    pte.write_bytes(random.Random(0).randbytes(pte.stat().st_size))
    app = tmp_path / "app"
    (app / "app").mkdir(parents=True)
    (app / "app" / "build.gradle").write_text("")
    args = ["run", prog, "--prompt", "x"] if command == "run" else ["bundle", prog, app]
    res = kvx(*args)  # unmatched hash first
    assert_one_line(res.returncode, res.stderr, "does not match its manifest")
    set_hash(prog, "model.pte")
    res = kvx(*args)
    assert_one_line(res.returncode, res.stderr, "not a program (bad or truncated header)")
    assert not (app / "app/src/main/assets").exists()


# ---------------------------------------------------------------- 4. default names encode every option

def test_default_names_differ_in_every_program_option(tiny_model):
    variants = [OPTS, *(CacheOptions(**{**OPTS.to_dict(), k: v}) for k, v in [
        ("window", 8), ("sinks", 0), ("group", 16), ("rotate_keys", False), ("seed", 1), ("max_context", 96),
        ("clip", "none"), ("clip", "k2=0.6,v2=0.9"),
        ("policy", "random:0.5,0.5,0,0"), ("policy", "random:0.5,0.5,0.0,0")])]
    learned = [CacheOptions(policy="learned", budget_bits=b) for b in (None, 3.0, 4.5)]
    names = [default_name(tiny_model, o, "executorch", "portable", "fp32") for o in variants + learned]
    assert len(set(names)) == len(names), names
    assert all("/" not in n and not n.startswith(".") for n in names)


# ---------------------------------------------------------------- 5. SIGTERM cleans up; dead builds' leftovers go

def test_sigterm_during_build_leaves_nothing(model_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "kvexport.cli", "build", "--model", str(model_dir),
                             "--kv-policy", "static-4", "--max-context", "64",
                             "--out", str(tmp_path), "--name", "victim"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob(".victim.kvxtmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".victim.kvxtmp-*")), "the build never started writing"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_temporaries_of_dead_builds_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".other.kvxtmp-{dead.pid}-abc"
    live = tmp_path / f".mine.kvxtmp-{os.getpid()}-abc"
    for d in (stale, live):
        (d / "sub").mkdir(parents=True)
    lookalike = tmp_path / ".notes"
    lookalike.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not stale.exists() and live.exists() and lookalike.exists() and (tmp_path / "out" / "f").is_file()


# ---------------------------------------------------------------- 6. a budget means that budget

def test_budget_zero_is_refused_at_parse_time(capsys):
    rc, err = cli(capsys, "build", "--model", "smollm2-135m", "--random-weights", "--kv-budget-bits", "0")
    assert_one_line(rc, err, "--kv-budget-bits", "positive")


def test_missing_budget_names_the_budget_and_those_that_exist(tiny_model, hand_controller, tmp_path, monkeypatch):
    calib = tmp_path / "tiny"  # random-weight models share their base's calibration folder
    calib.mkdir()
    for b in (3, 4):
        shutil.copy(hand_controller, calib / f"controller-{b}.safetensors")
    shutil.copy(Path(__file__).parent.parent / "calibration/smollm2-135m-instruct/token_counts.json", calib)
    monkeypatch.setenv("KVEXPORT_CALIBRATION", str(tmp_path))
    with pytest.raises(KvxError, match=r"budget of 5 bits .*committed budgets: 3, 4"):
        build_cache(tiny_model, CacheOptions(policy="learned", budget_bits=5.0, max_context=64))
    assert build_cache(tiny_model, CacheOptions(policy="learned", budget_bits=3.0, max_context=64))


# ---------------------------------------------------------------- 7. everything else: one line, before long work

@pytest.mark.parametrize("args, needle", [
    (["generate", "--prompt", "x", "--max-context", "0"], "--max-context"),
    (["generate", "--prompt", "x", "--kv-window", "-1"], "--kv-window"),
    (["generate", "--prompt", "x", "--max-new-tokens", "ten"], "not a whole number"),
    (["generate", "--prompt", "x", "--kv-policy", "static-5"], "invalid policy 'static-5'"),
    (["build", "--kv-group", "0"], "--kv-group"),
    (["build", "--kv-budget-bits", "nan"], "--kv-budget-bits"),
    (["bench", "p", "--contexts", "128,abc"], "--contexts"),
    (["bench", "p", "--contexts", "128,,512"], "--contexts"),
    (["bench", "p", "--threads", "0"], "--threads"),
    (["bench", "p", "--decode-steps", "-3"], "--decode-steps"),
    (["bench", "--peers", "etllama-int2"], "unknown peer 'etllama-int2'"),
    (["bench"], "nothing to bench"),
    (["parity", "p", "--steps", "0"], "--steps"),
    (["eval", "--limit", "0"], "--limit"),
    (["eval", "--n-boot", "-5"], "--n-boot"),
    (["eval", "--batch-items", "0"], "--batch-items"),
    (["eval", "--kv-policy", "fp16,static-3"], "invalid policy 'static-3'"),
    (["calibrate", "--kv-budget-bits", "-1"], "--kv-budget-bits"),
    (["calibrate", "--kv-budget-bits", "3", "--windows", "0"], "--windows"),
])
def test_bad_option_values_are_one_line_at_parse_time(capsys, args, needle):
    assert_one_line(*cli(capsys, *args), needle)


def test_unwritable_output_paths_are_refused_before_the_model_loads(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [(["generate", "--prompt", "x", "--json", a_file / "r.json"], "is a file, not a directory"),
             (["generate", "--prompt", "x", "--json", tmp_path], "is a directory"),
             (["bench", "p", "--json", a_file / "sub" / "b.json"], "is a file"),
             (["build", "--out", a_file], "is a file"),
             (["eval", "--out", a_file / "x"], "is a file"),
             (["eval", "--records", tmp_path], "is a directory")]
    for args, needle in cases:
        assert_one_line(*cli(capsys, *args), needle)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_empty_prompt_for_a_program(pte_program, capsys):
    assert_one_line(*cli(capsys, "run", pte_program, "--prompt", ""), "the prompt is empty")


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_size": None}, "'hidden_size' is None"),
    ({"num_hidden_layers": "2"}, "'num_hidden_layers' is '2'"),
    ({"num_attention_heads": 3}, "do not fit together"),
    ({"rms_norm_eps": -1}, "'rms_norm_eps'"),
    ({"intermediate_size": 64}, "do not fit its config.json"),
    ({"num_hidden_layers": 3}, "do not fit its config.json: missing"),
    ({"vocab_size": 1000}, "do not fit its config.json"),
    ({"eos_token_id": 10**6}, "eos/bos token ids"),
])
def test_malformed_model_folders(model_dir, tmp_path, capsys, changes, needle):
    d = copy(model_dir, tmp_path / "m")
    _edit_config(d, **changes)
    assert_one_line(*cli(capsys, "generate", "--model", d, "--prompt", "x", "--json", tmp_path / "o.json"), needle)
    assert not (tmp_path / "o.json").exists()


def test_config_that_is_not_an_object(model_dir, tmp_path, capsys):
    d = copy(model_dir, tmp_path / "m")
    (d / "config.json").write_text("[1, 2]")
    assert_one_line(*cli(capsys, "generate", "--model", d, "--prompt", "x"), "not an object")


def _edit_manifest(prog: Path, edit) -> None:
    m = json.loads((prog / "manifest.json").read_text())
    m = edit(m)
    (prog / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: [m], "not a layout-v1 kvexport manifest"),
    (lambda m: {k: v for k, v in m.items() if k != "cache"}, "'cache' is missing"),
    (lambda m: {**m, "metadata": {**m["metadata"], "get_vocab_size": "49152"}}, "'metadata.get_vocab_size'"),
    (lambda m: {**m, "cache_options": {**m["cache_options"], "turbo": True}}, "unknown cache options ['turbo']"),
    (lambda m: {**m, "program": "../model.pte"}, "not among its hashed files"),
    (lambda m: {**m, "program_files": {"../../etc/passwd": "0"}}, "plain file names"),
    (lambda m: {**m, "tokenizer": {"files": []}}, "'tokenizer.sha256' is missing"),
    (lambda m: {**m, "cache": {**m["cache"], "state": {**m["cache"]["state"],  # as builds before layer-major pools
                                                       "pool4_k": {"shape": [9, 2, 2, 16], "dtype": "uint8"}}}},
     "slot-major KV pools"),
])
def test_malformed_manifests(pte_program, tmp_path, capsys, edit, needle):
    prog = copy(pte_program, tmp_path / "p")
    _edit_manifest(prog, edit)
    for args in (["run", prog, "--prompt", "x"], ["parity", prog], ["bench", prog, "--contexts", "8"]):
        assert_one_line(*cli(capsys, *args), needle)


def test_missing_and_invalid_tokenizer_files_are_named(pte_program, model_dir, tmp_path, capsys):
    prog = copy(pte_program, tmp_path / "p")
    (prog / "tokenizer_config.json").unlink()
    assert_one_line(*cli(capsys, "run", prog, "--prompt", "x"), "tokenizer file", "tokenizer_config.json is missing")
    d = copy(model_dir, tmp_path / "m")
    (d / "tokenizer_config.json").write_text("{")
    assert_one_line(*cli(capsys, "generate", "--model", d, "--prompt", "x"), "tokenizer_config.json is not valid JSON")
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.json").write_text('{"model": 1}')
    assert_one_line(*cli(capsys, "generate", "--model", d, "--prompt", "x"), "tokenizer.json is unreadable")


@pytest.mark.parametrize("tensor, value, needle", [
    ("w1", torch.zeros(2, 7), "w1 is torch.float32 [2, 7], expected float [2, 5]"),
    ("w2", torch.full((4, 2), float("nan")), "w2 has non-finite values"),
    ("feat_std", torch.zeros(5), "feat_std must be positive"),
])
def test_controllers_of_the_wrong_shape_or_non_finite(hand_controller, model_dir, tmp_path, capsys,
                                                       tensor, value, needle):
    from kvexport.controller.model import Controller

    ctrl = Controller.load(hand_controller)
    tensors = {n: getattr(ctrl, n).detach().clone() for n in ("w1", "b1", "w2", "b2", "feat_mean", "feat_std",
                                                              "class_bias")}
    tensors[tensor] = value
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"kvexport": json.dumps(ctrl.meta)})
    assert_one_line(*cli(capsys, "generate", "--model", model_dir, "--prompt", "x", "--kv-policy", f"learned:{path}",
                         "--max-context", "64"), needle)


# ---------------------------------------------------------------- corruption: every reader, three kinds of bytes

def corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "random": random.Random(1).randbytes(max(len(data), 64))}[kind])


KINDS = ("truncated", "empty", "random")


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_gguf(tmp_path, capsys, monkeypatch, kind):
    from kvexport.models.loader import embedded_gguf

    monkeypatch.setenv("KVEXPORT_CACHE", str(tmp_path / "cache"))
    src = embedded_gguf()
    gguf = tmp_path / "m.gguf"
    with open(src, "rb") as f:
        gguf.write_bytes(f.read(4 << 20))  # 4 MiB: header and vocabulary whole, tensor data cut
    if kind != "truncated":
        corrupt(gguf, kind)
    assert_one_line(*cli(capsys, "generate", "--model", gguf, "--prompt", "x", "--json", tmp_path / "o.json"),
                    "cannot read GGUF")
    assert tree(tmp_path / "cache" / "models") == [] and not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("file, needle", [("model.safetensors", "weights in"), ("config.json", "config.json"),
                                          ("tokenizer.json", "tokenizer.json")])
def test_corrupt_model_directory_files(model_dir, tmp_path, capsys, file, needle, kind):
    d = copy(model_dir, tmp_path / "m")
    corrupt(d / file, kind)
    before = tree(d)
    assert_one_line(*cli(capsys, "generate", "--model", d, "--prompt", "x", "--json", tmp_path / "o.json"), needle)
    assert tree(d) == before and not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_controller(hand_controller, model_dir, tmp_path, capsys, kind):
    path = tmp_path / "c.safetensors"
    shutil.copy(hand_controller, path)
    corrupt(path, kind)
    assert_one_line(*cli(capsys, "generate", "--model", model_dir, "--prompt", "x", "--kv-policy", f"learned:{path}",
                         "--json", tmp_path / "o.json"), "not a kvexport controller file")
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_manifest(pte_program, tmp_path, capsys, kind):
    prog = copy(pte_program, tmp_path / "p")
    corrupt(prog / "manifest.json", kind)
    assert_one_line(*cli(capsys, "run", prog, "--prompt", "x"), "manifest.json is corrupt")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["pte", "onnx"])
def test_corrupt_program_with_matching_hash(pte_program, onnx_program, tmp_path, target, kind):
    prog = copy(pte_program if target == "pte" else onnx_program, tmp_path / "p")
    name = json.loads((prog / "manifest.json").read_text())["program"]
    corrupt(prog / name, kind)
    set_hash(prog, name)
    res = kvx("run", prog, "--prompt", "x")  # a subprocess: a runtime that aborts must not take pytest with it
    assert_one_line(res.returncode, res.stderr, "cannot load")


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_records(model_dir, tmp_path, capsys, kind):
    from kvexport.eval.records import config_key

    records = tmp_path / "items.jsonl"
    lines = [json.dumps({"key": config_key({"i": i}), "task": "hellaswag", "idx": i}) for i in range(4)]
    records.write_text("\n".join(lines) + "\n")
    corrupt(records, kind)
    out = tmp_path / "out"
    args = ["eval", "--model", model_dir, "--tasks", "hellaswag", "--kv-policy", "fp16", "--limit", "1",
            "--records", records, "--out", out, "--report-only", "--n-boot", "10"]
    rc, err = cli(capsys, *args)
    if kind == "random":  # not text: refused, nothing appended, no report
        assert_one_line(rc, err, "is not a records file")
        assert not out.exists()
    else:  # a cut line (a killed run) or an empty file: read what is there, as a resume does
        assert rc == 0, err
