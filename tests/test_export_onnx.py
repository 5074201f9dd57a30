"""ONNX and ORT-format export of the tiny random Llama, run on ONNX Runtime and checked with the
parity engine (state as explicit graph inputs/outputs, double-buffered between steps)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from kvexport.errors import KvxError
from kvexport.export import ort_tools
from kvexport.export.build import build
from kvexport.export.runners import open_runner
from kvexport.models.tokenizer import TOKENIZER_FILES
from kvexport.parity import run_parity
from kvexport.session import CacheOptions

# Per (target, ops): fused programs run kvexport::layer_attention from our ONNX Runtime library, portable ones
# our ops as standard-ONNX functions on a stock runtime. Random routing over all four pools, two of them with values
# coarser than keys (k4v2, k8v4); the feature-driven rule (features, rarity table and rule inside the graph).
CASES = {("onnx", "fused"): ("random:0.3,0.3,0.2,0.2", "k4v2,k8v4"), ("onnx", "portable"): ("rule", "k4v2"),
         ("ort", "fused"): ("rule", CacheOptions().classes), ("ort", "portable"): ("rule", CacheOptions().classes)}


def _opts(policy: str, classes: str = CacheOptions().classes) -> CacheOptions:
    return CacheOptions(policy=policy, max_context=96, window=4, sinks=2, classes=classes)


@pytest.fixture(scope="module", params=sorted(CASES), ids="-".join)
def built(request, tiny_model, tmp_path_factory):
    target, ops = request.param
    out = tmp_path_factory.mktemp("graphs") / f"tiny-{target}-{ops}"
    return build(tiny_model, _opts(*CASES[request.param]), target, ops, "fp32", out, log=lambda m: None)


def test_program_matches_reference(built, tiny_model):
    result = run_parity(built, steps=24, loaded=tiny_model)
    assert result["passed"], result
    assert result["cache_state_equal"] and result["top1_agreement"] == 1.0
    assert result["rows"][-1]["avg_bits"] < 16  # the policy really quantized tokens inside the program


def test_manifest_describes_graph_state_and_runtime(built):
    m = json.loads((built / "manifest.json").read_text())
    info, state, fused = m["onnx"], m["cache"]["state"], m["ops_mode"] == "fused"
    in_place = ["sink_k", "sink_v", "win_k", "win_v", "evict_k", "evict_v"] if fused else []
    assert info["inputs"][:2] == ["tokens", "input_pos"] and info["outputs"][:2] == ["logits", "kv_stats"]
    assert info["inputs"][2:] == [f"state.{n}" for n in state] and info["outputs"][2:] == [
        f"new_state.{n}" for n in state if n not in in_place
    ]
    assert info["state_in_place"] == in_place and set(in_place) <= set(state)
    # the pools are written by a ScatterND after every reader: one buffer for state and new_state
    assert {"pool2_k", "pool4_vs", "pool_pos8"} <= set(info["state_aliased"]) <= set(state) - set(in_place)
    # the glue folded (kvexport.export.onnx_fuse): 2 layers x 2 rotary (fused: none, the kernel applies RoPE); the 3
    # norms after a residual add in the blocks (the final norm too where it reads the whole chunk, not the last row
    # alone), not the embedding's
    ops = info["op_counts"]
    assert ops.get("com.microsoft::RotaryEmbedding") == (None if fused else 4), ops
    assert ops.get("com.microsoft::SkipSimplifiedLayerNormalization") in (3, 4) and ops.get("Pow", 0) <= 2, ops
    assert info["opsets"]["ai.onnx"] == 18 and info["op_counts"]["ScatterND"] >= len(state) - 3 - len(in_place)
    assert not any(op in info["op_counts"] for op in ("BitShift", "BitwiseOr", "BitwiseAnd"))
    assert (built / info["initial_state"]).is_file()
    # fused: one library node a layer and one for the overflow rule (whose exported reference is ~14 nodes a round
    # and class: CumSum ranks), needing ONNX Runtime 1.18 (API 18) and our library
    assert info["op_counts"].get("kvexport::layer_attention", 0) == (2 if fused else 0)
    assert info["op_counts"].get("kvexport::allocate", 0) == (1 if fused else 0)
    assert ("CumSum" in info["op_counts"]) == (not fused), info["op_counts"]
    assert info.get("custom_ops_library") == ("libkvexport_ort.so" if fused else None)
    assert info.get("custom_ops") == (["kvexport::layer_attention", "kvexport::allocate"] if fused else None)
    if m["target"] == "ort":
        assert m["program"] == "model.ort" and set(m["program_files"]) == {
            "model.ort",
            "required_operators.config",
            "initial_state.safetensors",
        }
        assert info["min_ort_version"] == ("1.18" if fused else "1.17")  # library API 18; the glue's contrib ops
        assert "ScatterND" in info["required_operators"]["ai.onnx"]
        library_ops = sorted(info["required_operators"].get("kvexport", ()))
        assert library_ops == (["allocate", "layer_attention"] if fused else [])
    else:
        assert m["program"] == "model.onnx" and info["min_ort_version"] == ("1.18" if fused else "1.17")
        model = onnx.load(str(built / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        # our ops are kvexport:: nodes whose standard-ONNX bodies are the model's local functions, except the
        # library's layer_attention and allocate
        assert {o.domain for o in model.opset_import} == {"", "kvexport", "com.microsoft"}
        functions = {(f.domain, f.name) for f in model.functions}
        assert ("kvexport", "quantize_pack") in functions
        assert not functions & {("kvexport", "layer_attention"), ("kvexport", "allocate")}
        assert (("kvexport", "pool_attention") in functions) != fused
        assert any(n.domain == "kvexport" for n in model.graph.node)
        assert all(n.domain in ("", "kvexport") for f in model.functions for n in f.node)
        assert json.loads(model.metadata_props[0].value)["get_max_context_len"] == 96


def test_fused_program_names_its_library(built, monkeypatch):
    """A stock ONNX Runtime session cannot load a fused program (the error names the kvexport domain's op), and
    when our library cannot be built the runner says which library it needed, in one line."""
    import onnxruntime as ort

    from kvexport.native_build import BuildError

    m = json.loads((built / "manifest.json").read_text())
    if m["ops_mode"] != "fused":
        pytest.skip("portable programs need no library")
    with pytest.raises(Exception, match=r"kvexport:(layer_attention|allocate)\b"):
        ort.InferenceSession(str(built / m["program"]), providers=["CPUExecutionProvider"])

    def no_npm(force=False):
        raise BuildError("npm not installed")

    monkeypatch.setattr(ort_tools, "build_ort_library", no_npm)
    with pytest.raises(KvxError, match=r"kvexport ops \(layer_attention, ...\) from libkvexport_ort.so: npm not"):
        open_runner(built)


def test_kvexport_run_of_an_onnx_program_imports_no_torch(built):
    """``kvexport run`` of an ONNX program is the session, numpy and the tokenizer: torch (245 MB of RSS) stays out
    of the process, the command line, the manifest check, the custom-op library's build and the runner alike."""
    code = ("import sys; from kvexport.cli import main; rc = main(['run', sys.argv[1], '--prompt', 'hello world', "
            "'--max-new-tokens', '3']); print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(built)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout and "KV cache:" in done.stderr


def test_state_is_reset_between_runs(built):
    runner = open_runner(built)
    first = runner.prefill(list(range(1000, 1010)))
    runner.reset()
    assert (runner.prefill(list(range(1000, 1010))) == first).all()
    assert runner.last_stats[7] == 10  # tokens cached


def test_corrupt_program_and_too_old_runtime_are_one_line_errors(built, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    m = json.loads((bad / "manifest.json").read_text())
    prog = bad / m["program"]
    prog.write_bytes(prog.read_bytes()[:1000])
    with pytest.raises(KvxError, match="does not match its manifest"):
        open_runner(bad)
    m["program_files"][m["program"]] = __import__("hashlib").sha256(prog.read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KvxError, match="ONNX Runtime cannot load"):
        open_runner(bad)
    monkeypatch.setattr(ort_tools, "installed_version", lambda: "1.13.1")
    with pytest.raises(KvxError, match=rf"needs ONNX Runtime >= {m['onnx']['min_ort_version']} \(installed 1.13.1\)"):
        open_runner(built)


def test_context_beyond_the_build_is_refused(built):
    runner = open_runner(built)
    runner.prefill(list(range(1000, 1096)))
    with pytest.raises(KvxError, match="exceed the program's context of 96"):
        runner.step([5])


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_build_run_and_warn_about_old_runtimes(weights, tiny_model, tmp_path):
    """Both are MatMulNBits (blocks of 32, symmetric, inputs int8 per block of 32: accuracy level 4) and the
    reference computes that on ONNX Runtime's own codes (``nbits_weights``), so the program passes parity at float
    precision wherever no input code flips. (int8 was ``quantize_dynamic``, one activation scale per tensor: median
    KL 0.15 per step on the real model; then fp32 inputs: 166 ms/token on the real model, no fast 8-bit kernel.)"""
    messages = []
    old = {"int8": "1.13", "int4": "1.16"}[weights]
    out = build(
        tiny_model,
        _opts("random:0.3,0.3,0.2,0.2"),
        "onnx",
        "portable",
        weights,
        tmp_path / weights,
        log=messages.append,
        ort_version=old,
    )
    m = json.loads((out / "manifest.json").read_text())
    ops = m["onnx"]["op_counts"]
    warning = [msg for msg in messages if msg.startswith("warning")]
    assert len(warning) == 1 and f"ONNX Runtime {old} cannot run this program" in warning[0]
    # 9 linears quantized (4 per block: qkv, o, gate_up, down; and the lm_head); the key rotation's MatMuls
    # (q and k of both layers) stay fp32
    assert ops["MatMul"] >= 4 and m["cache_options"]["rotate_keys"]
    assert ops["com.microsoft::MatMulNBits"] == 9
    if weights == "int8":  # 8-bit MatMulNBits runs from 1.23 on
        assert m["onnx"]["min_ort_version"] == "1.23" and "MatMulNBits(bits=8) (needs 1.23)" in warning[0]
        assert "ops newer than opset 17" in warning[0] and "ScatterND" in warning[0]
    else:
        assert m["onnx"]["min_ort_version"] == "1.17" and "MatMulNBits (needs 1.17)" in warning[0]
    levels = [a.i for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4] * 9
    result = run_parity(out, steps=24, loaded=tiny_model)
    assert result["cache_state_equal"]
    assert result["passed"] and result["median_kl"] < 1e-6, result


def _hf_directory(loaded, path):
    """The tiny model as a Hugging Face directory (what ``--model DIR`` takes)."""
    from safetensors.torch import save_file

    a = loaded.args
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": a.dim,
                "num_hidden_layers": a.n_layers,
                "num_attention_heads": a.n_heads,
                "num_key_value_heads": a.n_kv_heads,
                "intermediate_size": a.intermediate_size,
                "vocab_size": a.vocab_size,
                "rope_theta": a.rope_theta,
                "rms_norm_eps": a.norm_eps,
                "max_position_embeddings": a.max_position,
                "tie_word_embeddings": True,
                "bos_token_id": loaded.tokenizer.bos_id,
                "eos_token_id": loaded.tokenizer.eos_ids,
            }
        )
    )
    save_file(
        {f"model.{k}": v.contiguous() for k, v in loaded.state_dict.items() if k != "lm_head.weight"},
        str(path / "model.safetensors"),
    )
    for f in TOKENIZER_FILES:
        if (loaded.tokenizer.directory / f).is_file():
            shutil.copy(loaded.tokenizer.directory / f, path / f)
    return path


def test_cli_build_ort_then_parity(tiny_model, tmp_path, capsys):
    from kvexport.cli import main

    model = _hf_directory(tiny_model, tmp_path / "tiny")
    args = [
        "--model",
        str(model),
        "--kv-policy",
        "static-4",
        "--kv-classes",
        "k4v2",  # the .ort conversion inlines the nested dequantize function of K/V-split pools
        "--max-context",
        "40",
        "--kv-window",
        "4",
        "--kv-sinks",
        "2",
        "--out",
        str(tmp_path / "graphs"),
        "--name",
        "t",
    ]
    assert main(["build", "--target", "ort", *args]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["parity", str(tmp_path / "graphs" / "t"), "--steps", "4"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_state_is_aliased_only_when_every_reader_runs_before_the_write():
    """``aliased_state``: ``new_state.a = ScatterND(state.a, .., f(state.a))`` may share one buffer (the reader
    feeds the write), and so may an unchanged ``new_state.d = Identity(state.d)`` whatever reads it;
    ``new_state.b = ScatterND(state.b, .., x)`` with a reader of ``state.b`` the write does not wait for may not,
    nor may a ScatterND that accumulates (``reduction``)."""
    from onnx import TensorProto, helper

    from kvexport.export.onnx import aliased_state

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 2])  # noqa: E731
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1])
    nodes = [
        helper.make_node("Neg", ["state.a"], ["a_read"]),
        helper.make_node("Slice", ["a_read", "zero", "one"], ["row"]),
        helper.make_node("ScatterND", ["state.a", "idx", "row"], ["new_state.a"]),
        helper.make_node("Neg", ["state.b"], ["b_read"]),
        helper.make_node("ScatterND", ["state.b", "idx", "x"], ["new_state.b"]),
        helper.make_node("ScatterND", ["state.c", "idx", "x"], ["new_state.c"], reduction="add"),
        helper.make_node("Identity", ["state.d"], ["new_state.d"]),
        helper.make_node("Neg", ["state.d"], ["d_read"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [*map(vi, ("state.a", "state.b", "state.c", "state.d")), idx, helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [1, 2])], list(map(vi, ("new_state.a", "new_state.b", "new_state.c", "new_state.d",
                                                             "b_read", "d_read"))),
        [onnx.numpy_helper.from_array(np.array([v], dtype=np.int64), n) for v, n in ((0, "zero"), (1, "one"))])
    assert aliased_state(helper.make_model(graph), ["a", "b", "c", "d"]) == ["a", "d"]
