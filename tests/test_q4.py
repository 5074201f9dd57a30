"""``q4`` weights: Q4_1 codes recovered exactly, the 8da4w + block-sum rewrite, the GGUF's nibble order,
the compact tied embedding (Q8_0 codes), and a tiny ExecuTorch program with them against its reference."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvexport.models.q4 import (
    BLOCK,
    Q4Int8Linear,
    Q4Linear,
    dequantize_q4_1,
    int4_weight,
    q4_1_codes,
    quantize_q4,
    quantize_q8_0_rows,
)
from kvexport.models.tied import compact_embedding, q8_0_codes, q8_0_linear
from kvexport.models.weights import quantize_weights


def random_q4_1(out_f: int, in_f: int, seed: int = 0, bf16_scales: bool = False):
    """Codes (every block holds a 0 and a 15, as llama.cpp's quantizer guarantees), fp16 d and m."""
    gen = torch.Generator().manual_seed(seed)
    nb = in_f // BLOCK
    codes = torch.randint(0, 16, (out_f, nb, BLOCK), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15
    codes = codes[..., torch.randperm(BLOCK, generator=gen)].reshape(out_f, in_f).to(torch.uint8)
    d = (torch.rand(out_f, nb, generator=gen) * 0.01 + 1e-3).half().float()
    if bf16_scales:  # d exactly representable in bf16 and fp16: the rewrite loses nothing
        d = d.bfloat16().float().half().float()
    m = (-torch.rand(out_f, nb, generator=gen) * 0.08).half().float()
    return codes, d, m


def test_codes_are_recovered_bit_exactly_from_dequantized_weights():
    codes, d, m = random_q4_1(48, 96)
    got_codes, got_d, got_m, exact = q4_1_codes(dequantize_q4_1(codes, d, m))
    assert exact and torch.equal(got_codes, codes) and torch.equal(got_d, d) and torch.equal(got_m, m)
    off_grid = dequantize_q4_1(codes, d, m) + torch.randn(48, 96) * 1e-4  # not Q4_1: a re-quantization
    assert not q4_1_codes(off_grid)[3]


def test_rewrite_matches_direct_dequantize_and_matmul():
    codes, d, m = random_q4_1(64, 128, seed=1, bf16_scales=True)
    w = dequantize_q4_1(codes, d, m)
    lin = Q4Linear(codes, d, m, exact=True)
    x = torch.randn(3, 5, 128)
    # The rewrite itself (weights dequantized, no activation quantization): exact up to fp32 sums.
    sums = x.unflatten(-1, (128 // BLOCK, BLOCK)).sum(-1)
    rewritten = F.linear(x, lin.weight.dequantize()) + F.linear(sums, lin.offsets)
    torch.testing.assert_close(rewritten, F.linear(x, w), rtol=0, atol=2e-5)
    # The module: the same weights applied to the int8 input x~ (per token, asymmetric) in BOTH terms, the
    # block sums included; x~ read back through an identity 8da4w weight (codes 1, scales 1: exact).
    identity = int4_weight(torch.eye(128, dtype=torch.int8), torch.ones(128, 128 // BLOCK))
    x_int8 = F.linear(x, identity)
    assert 0 < (x_int8 - x).abs().max() < 0.05
    torch.testing.assert_close(lin(x), F.linear(x_int8, w), rtol=0, atol=2e-5)
    # block sums of the float input instead (the form before) miss it by the offsets times the rounding
    float_sums = F.linear(x, lin.weight) + F.linear(sums, lin.offsets)
    assert (float_sums - F.linear(x_int8, w)).abs().max() > 1e-3


def test_bf16_scale_rounding_is_the_only_weight_difference():
    codes, d, m = random_q4_1(32, 64, seed=2)
    lin = Q4Linear(codes, d, m, exact=True)
    expanded = lin.weight.dequantize() + lin.offsets.repeat_interleave(BLOCK, dim=1)  # [out, in]
    bound = 8 * (d.bfloat16().float() - d).abs().repeat_interleave(BLOCK, dim=1) + 1e-7
    diff = (expanded - dequantize_q4_1(codes, d, m)).abs()
    assert (diff <= bound).all() and diff.max() > 0


def test_gguf_nibble_order_survives_dequantization():
    """Q4_1 bytes as llama.cpp stores them (low nibble: element j, high nibble: element j+16),
    dequantized by the gguf package the model converter uses: our codes are those nibbles."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    gen = np.random.default_rng(3)
    rows, nb = 4, 3
    nibbles = gen.integers(0, 16, size=(rows, nb, BLOCK), dtype=np.uint8)
    nibbles[..., 0], nibbles[..., 1] = 0, 15
    d = np.full((rows, nb, 1), 0.0123, dtype=np.float16)
    m = np.full((rows, nb, 1), -0.0456, dtype=np.float16)
    packed = nibbles[..., :16] | (nibbles[..., 16:] << 4)  # [rows, nb, 16]
    raw = np.concatenate([d.view(np.uint8), m.view(np.uint8), packed], axis=-1).reshape(rows, -1)
    w = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1).astype(np.float32))  # [rows, nb*32]
    codes, got_d, got_m, exact = q4_1_codes(w)
    assert exact and torch.equal(codes, torch.from_numpy(nibbles.reshape(rows, -1)))
    assert torch.equal(got_d, torch.from_numpy(d[..., 0].astype(np.float32)))


def test_every_block_linear_and_the_embedding_of_the_default_model_are_exact(real_model):
    model = real_model.build()
    table = model.embed_tokens.weight.detach().clone()
    summary = quantize_q4(model)
    assert summary == {"linears": 4 * real_model.args.n_layers, "exact": 4 * real_model.args.n_layers,
                       "requantized": 0, "block": BLOCK, "source": "gguf-q4_1-codes"}
    assert compact_embedding(model)  # the tied table is Q8_0 in this GGUF: its codes are exact too
    tokens = torch.tensor([[0, 1, 2, 49151], [17, 300, 9000, 5]])
    assert torch.equal(model.embed_tokens(tokens), table[tokens])
    assert torch.equal(model.lm_head.weight, table)  # untied: the head keeps the float table


def test_q8_0_codes_and_the_shared_embedding(tiny_model):
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-127, 128, (50, 64), generator=gen, dtype=torch.int8)
    q[:, 0] = 127  # llama.cpp's d = amax / 127: every block has a code of magnitude 127
    q[:, 32] = -127
    d = (torch.rand(50, 2, generator=gen) * 0.01 + 1e-4).half().float()
    table = (q.float().reshape(50, 2, BLOCK) * d[..., None]).reshape(50, 64)
    codes, got_d, exact = q8_0_codes(table)
    assert exact and torch.equal(codes, q) and torch.equal(got_d, d)

    model = tiny_model.build()
    assert model.lm_head.weight is model.embed_tokens.weight  # tied before
    quantize_weights(model, "q4-h8")
    assert model.embed_tokens.codes.dtype == torch.int8 and model.lm_head.weight.qdata.dtype == torch.int8


def test_q8_0_activations_and_the_q8_0_head_reference():
    """Activations per block of 32: codes in [-127, 127], within half a step of x, an all-zero block
    gives scale 0; the head equals sum_b (d_b sx_b) (q_b . xq_b) computed in float64, and stays within
    the activation rounding of the float head."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 96, generator=gen) * torch.tensor([1.0, 1e-3, 50.0]).repeat_interleave(32)
    x[1, 32:64] = 0
    xq, sx = quantize_q8_0_rows(x)
    assert xq.dtype == torch.int8 and sx.shape == (3, 3) and xq.abs().max() <= 127
    assert sx[1, 1] == 0 and not xq[1, 32:64].any()
    assert ((xq.float().unflatten(-1, (3, 32)) * sx[..., None]).flatten(-2) - x).abs().le(
        sx.repeat_interleave(32, -1) * 0.5001).all()
    codes = torch.randint(-127, 128, (37, 96), generator=gen, dtype=torch.int8)
    d = (torch.rand(37, 3, generator=gen) * 0.01 + 1e-4).half()
    got = q8_0_linear(x, codes, d)  # [3, 37]
    blocks = (xq.double().unflatten(-1, (3, 32))[:, None] * codes.double().unflatten(-1, (3, 32))[None]).sum(-1)
    want = (blocks * d.double()[None] * sx.double()[:, None]).sum(-1)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    w = (codes.float().unflatten(-1, (3, 32)) * d.float()[..., None]).flatten(-2)
    assert (got - x @ w.T).abs().max() <= 0.02 * (x @ w.T).abs().max()


@pytest.fixture(scope="module")
def q4_program(tiny_model, tmp_path_factory):
    from kvexport.export.build import build
    from kvexport.session import CacheOptions

    opts = CacheOptions(policy="fp16", max_context=64, window=4, sinks=2)  # the weights are the point here
    out = tmp_path_factory.mktemp("graphs") / "tiny-q4"
    return build(tiny_model, opts, "executorch", "fused", "q4-h8", out, log=lambda m: None)


def test_q4_program_matches_its_reference(q4_program, tiny_model):
    from kvexport.parity import run_parity

    result = run_parity(q4_program, steps=20, loaded=tiny_model)
    assert result["passed"], result
    manifest = json.loads((q4_program / "manifest.json").read_text())
    # The tiny model's weights are random floats, not Q4_1 / Q8_0: the manifest says they were re-quantized.
    q4 = manifest["q4"]
    assert q4["source"] == "requantized-q4_1-minmax" and q4["linears"] == 8 and q4["exact"] == 0
    assert q4["embedding"] == "requantized-q8_0" and q4["lm_head"] == "8da8w"
    xnn = manifest["executorch"]["xnnpack_ops"]  # 4-bit weights dequantized inside XNNPACK's GEMM, not outside
    assert xnn.get("torchao.dequantize_affine.default", 0) >= 9 and "linear.default" in xnn
    assert not any("dequantize" in k for k in manifest["executorch"]["executorch_kernel_ops"])


def test_q4_q8_program_stores_the_table_once_and_matches_its_reference(q4_program, tiny_model, tmp_path):
    """``q4-q8``: the lm_head reads the lookup's Q8_0 table through kvexport::q8_linear: one int8 copy
    of the [vocab, dim] table instead of q4-h8's two, parity against the reference that runs the
    same Q8_0 arithmetic; ``--ops portable`` (no kernel library) is refused before any work."""
    from kvexport.errors import KvxError
    from kvexport.export.build import build
    from kvexport.parity import run_parity
    from kvexport.session import CacheOptions

    opts = CacheOptions(policy="fp16", max_context=64, window=4, sinks=2)
    program = build(tiny_model, opts, "executorch", "fused", "q4-q8", tmp_path / "tiny-q4q8", log=lambda m: None)
    result = run_parity(program, steps=20, loaded=tiny_model)
    assert result["passed"], result
    manifest = json.loads((program / "manifest.json").read_text())
    assert manifest["q4"]["lm_head"] == "q8_0" and manifest["q4"]["embedding"] == "requantized-q8_0"
    assert any("q8_linear" in op for op in manifest["executorch"]["executorch_kernel_ops"])
    table = tiny_model.args.vocab_size * tiny_model.args.dim  # bytes of one int8 copy
    saved = (q4_program / "model.pte").stat().st_size - (program / "model.pte").stat().st_size
    assert 0.9 * table < saved < 1.2 * table, (saved, table)
    with pytest.raises(KvxError, match="--ops fused"):
        build(tiny_model, opts, "executorch", "portable", "q4-q8", tmp_path / "refused", log=lambda m: None)
    assert not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def gguf_like(tiny_model):
    """The tiny model with its block linears on a Q4_1 grid and its tied table on a Q8_0 grid, as
    they are in a GGUF-converted model."""
    import dataclasses

    state = {}
    for name, w in tiny_model.state_dict.items():
        if name.startswith("layers.") and name.endswith("_proj.weight"):
            codes, d, m, _ = q4_1_codes(w)
            w = dequantize_q4_1(codes, d, m)
        elif name == "embed_tokens.weight":
            q, d, _ = q8_0_codes(w)
            w = (q.float().unflatten(-1, (-1, BLOCK)) * d[..., None]).flatten(-2)
        state[name] = w
    return dataclasses.replace(tiny_model, name="tiny-gguf-like", state_dict=state)


def test_build_defaults_to_q4_only_for_models_that_hold_the_codes(gguf_like, tiny_model):
    from kvexport.models.q4 import holds_q4_1_codes

    assert holds_q4_1_codes(gguf_like.state_dict) and not holds_q4_1_codes(tiny_model.state_dict)
    hf_names = {f"model.{k}" if k.startswith(("layers.", "embed_tokens", "norm")) else k: v
                for k, v in gguf_like.state_dict.items()}  # a converted GGUF / HF directory's names
    assert holds_q4_1_codes(hf_names)


@pytest.mark.parametrize("library", [False, True], ids=["stock", "library"])
@pytest.mark.parametrize("out_f,in_f,rows", [(96, 64, 5), (64, 192, 1), (40, 2112, 3)])
def test_onnx_runtime_block_int8_linear_is_the_reference(out_f, in_f, rows, library):
    """One MatMul rewritten by onnx_q4 and run by ONNX Runtime (MatMulNBits at accuracy level 4 + the block-offset
    product: two MatMuls and an Add on a stock runtime, one kvexport::block_offset node with our library) equals
    Q4Int8Linear to float rounding, while quantizing the input moves it ~1e-2 from x @ wᵀ; an input column with an
    outlier (late down_proj inputs reach 447) included. Shapes: prefill rows (the library op's parallel tasks) and
    a decode row; 66 blocks (more than the op sums in one pass)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from kvexport.export import onnx_q4
    from kvexport.native_build import build_ort_library

    codes, d, _ = random_q4_1(out_f, in_f, seed=5)
    # blocks whose range holds 0, as in a real model's linears (m = -d·u, u in [0, 15))
    m = (-torch.rand(d.shape, generator=torch.Generator().manual_seed(7)) * 15 * d).half().float()
    w = dequantize_q4_1(codes, d, m)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, out_f])],
        [numpy_helper.from_array(w.T.contiguous().numpy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("kvexport", 1)])
    assert onnx_q4.rewrite(model, library=library)["q4_1"] == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["MatMulNBits", "block_offset"] if library else ["MatMulNBits", "MatMul", "MatMul", "Add"]), ops
    offsets = next(t for t in model.graph.initializer if t.name.endswith(".block_offsets"))
    # Q4_1's fp16 m and d give offsets m + z·d that fp16 holds exactly: the library op reads them in fp16
    assert offsets.data_type == (TensorProto.FLOAT16 if library else TensorProto.FLOAT)
    opts = ort.SessionOptions()
    if library:
        opts.register_custom_ops_library(str(build_ort_library()))
    x = torch.randn(1, rows, in_f, generator=torch.Generator().manual_seed(6)) * 3
    x[..., 7] = 300.0
    want, exact = Q4Int8Linear(w)(x), x @ w.T
    scale = exact.abs().max()
    variants = [model]
    if library:  # the op's fp32 offsets too (what a model whose offsets fp16 cannot hold gets)
        fp32 = onnx.ModelProto()
        fp32.CopyFrom(model)
        t = next(t for t in fp32.graph.initializer if t.name == offsets.name)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(offsets).astype(np.float32), offsets.name))
        variants.append(fp32)
    for variant in variants:
        session = ort.InferenceSession(variant.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert (got - want).abs().max() / scale < 2e-6
    assert 1e-4 < (want - exact).abs().max() / scale < 5e-2  # the input's int8 rounding, not wrong codes


def test_onnx_q4_program_matches_its_reference(gguf_like, tmp_path):
    """MatMulNBits on the codes: 4-bit linears (uint8 zero points plus the block-offset product), the 8-bit
    lm_head, the embedding reading its codes, inputs quantized per block of 32 (``Q4Int8Linear`` in the
    reference). The cache stays at 16 bits: a quantized one turns fp32-level differences into code flips (static-4
    here: one step at KL 2e-3, every other step at the fp32 level), which is not what this test is about."""
    from kvexport.export.build import build
    from kvexport.parity import run_parity
    from kvexport.session import CacheOptions

    opts = CacheOptions(policy="fp16", max_context=64, window=4, sinks=2)
    out = build(gguf_like, opts, "onnx", "fused", "q4", tmp_path / "tiny-onnx-q4", log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    ops = manifest["onnx"]["op_counts"]
    assert ops.get("com.microsoft::MatMulNBits") == 9, ops  # 8 block linears (4 a block) + the lm_head
    assert ops.get("kvexport::block_offset") == 8 and "MatMul" not in ops, ops  # each block linear's offset term
    library_ops = ("layer_attention", "allocate", "block_offset")
    assert manifest["onnx"]["custom_ops"] == [f"kvexport::{op}" for op in library_ops]
    assert manifest["onnx"]["min_ort_version"] == "1.23"  # the lm_head's 8-bit MatMulNBits
    table = gguf_like.args.vocab_size * gguf_like.args.dim
    size = sum((out / f).stat().st_size for f in manifest["program_files"])
    assert table < size < 1.5 * table  # the tied table once, in 8 bits (fp32: 8 bytes a weight, two copies)
    result = run_parity(out, steps=16, loaded=gguf_like)
    # Most steps agree to float precision (median KL 9e-10 here); where a rounding-order difference moves an input
    # code, one step reaches KL ~4e-3 (the 1e-6-perturbed reference: 7e-4), within the noise rule. Wrong codes,
    # scales or zero points cost KL >= 0.1 at every step.
    assert result["passed"] and result["median_kl"] < 1e-6 and result["top1_agreement"] == 1.0, result
    # kvexport eval --program scores beside it a reference with the same arithmetic (it took fp32 weights before)
    from kvexport.eval.cli import program_setup
    from kvexport.models.q4 import Q4Int8Linear

    *_, label, model = program_setup(str(out), "onnx", loaded=gguf_like)
    assert label == "onnx:q4" and sum(isinstance(m, Q4Int8Linear) for m in model.modules()) == 8
