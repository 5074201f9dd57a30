"""``kvexport::layer_attention``: the C++ kernel, run through real .pte programs in the ExecuTorch
runtime and through ONNX models in ONNX Runtime with our custom-op library (the same core behind two
wrappers), against its Python reference (kvexport.kv.layer_attention) on random caches.

Every unfilled slot holds NaN (fp parts, and the scales/zeros of quantized pools), so any read
beyond the fill counts shows up. Cases cover empty caches, sinks only, a chunk crossing from the
sinks into the window, window only, a wrapped ring, full and over-full pools (fills are clamped),
T > 1 chunks, fp16 and fp32 storage, a window of 0 (the chunk itself is staged for eviction), with and
without the key rotation (its written keys, RoPE applied by the kernel, must match the reference bit for bit),
classes with values coarser than keys (k4v2, k8v4) beside equal ones."""

from __future__ import annotations

import math

import pytest
import torch
from kvops_testlib import export_et

import kvexport.ops as ops
from kvexport.kv import layer_attention as ref
from kvexport.models.llama import rope_cos_sin

L, H, HQ, D = 2, 3, 9, 64
SCALE = 1.0 / math.sqrt(D)
T_MAX = 4
# name: (sinks, window, float dtype, pool capacities (2, 4, 8, 16 bit), layer, features, rotate (mask: 1 keys,
#        2 values), value bits of the 2-, 4-, 8-bit-key classes, quantization group); the groups take the kernel's
#        three ways of summing V rows (32, 8 or 1 columns at a time)
CONFIGS = {
    "fp16-s4-w8": (4, 8, torch.float16, (5, 70, 7, 3), 1, True, 3, (2, 2, 8), 32),
    "fp32-s0-w4": (0, 4, torch.float32, (3, 0, 4, 2), 0, True, 0, (2, 4, 4), 16),
    "fp16-s2-w0": (2, 0, torch.float16, (0, 9, 0, 66), 1, False, 2, (2, 4, 8), 4),
    "fp16-s4-w8-keys": (4, 8, torch.float16, (5, 70, 7, 3), 0, True, 1, (2, 4, 8), 64),
}
MUTABLE = ("sink_k", "sink_v", "win_k", "win_v", "evict_k", "evict_v")


def cache_shapes(cfg):
    sinks, window, fp, caps, *_ = cfg
    shapes = {"sink_k": (sinks + 1, L, H, D), "sink_v": (sinks + 1, L, H, D), "win_k": (window + 1, L, H, D),
              "win_v": (window + 1, L, H, D), "evict_k": (T_MAX, L, H, D), "evict_v": (T_MAX, L, H, D),
              "pool16_k": (L * (caps[3] + 1), H, D), "pool16_v": (L * (caps[3] + 1), H, D)}  # pools: layer-major
    for b, vb, cap in zip((2, 4, 8), cfg[7], caps):
        for name, bits in (("k", b), ("v", vb)):
            shapes[f"pool{b}_{name}"] = (L * (cap + 1), H, D * bits // 8)
            shapes[f"pool{b}_{name}s"] = shapes[f"pool{b}_{name}z"] = (L * (cap + 1), H, D // cfg[8])
    return shapes


class LayerStep(torch.nn.Module):
    """The mutable cache parts are buffers (as in the step program); each call first loads them
    from its inputs, runs the op once, and returns (out, recv, the six mutated buffers). The
    queries pass an identity Linear (exact in fp32) so the program also has an XNNPACK part."""

    def __init__(self, cfg):
        super().__init__()
        self.layer, self.features, self.rotate, self.group = cfg[4], cfg[5], cfg[6], cfg[8]
        self.proj = torch.nn.Linear(HQ * D, HQ * D)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(HQ * D))
            self.proj.bias.zero_()
        shapes = cache_shapes(cfg)
        for name in MUTABLE:
            self.register_buffer(name, torch.zeros(shapes[name], dtype=cfg[2]))

    def forward(self, q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, *pools):
        bufs = [getattr(self, n) for n in MUTABLE]
        for buf, x in zip(bufs, (sink_k, sink_v, win_k, win_v, evict_k, evict_v)):
            buf.copy_(x)
        q = self.proj(q)
        out, recv = ops.layer_attention(q, k, v, cos, sin, state, bufs, pools, self.layer, self.group, SCALE,
                                        self.features, self.rotate)
        return (out, recv, *(b.clone() for b in bufs))


def make_inputs(cfg, p0: int, t: int, fills, seed: int):
    """Random chunk and cache for ``state = (p0, *fills)``; unfilled slots are NaN."""
    sinks, window, fp, caps, *_ = cfg
    g = torch.Generator().manual_seed(seed)
    shapes = cache_shapes(cfg)
    n_s, n_w = min(p0, sinks), min(max(p0 - sinks, 0), window)
    filled = {"sink": n_s, "win": n_w, "pool16": min(fills[3], caps[3]), "evict": T_MAX}
    for b, f, cap in zip((2, 4, 8), fills, caps):
        filled[f"pool{b}"] = min(f, cap)
    cache = {}
    for name, shape in shapes.items():
        part = name.rsplit("_", 1)[0]
        per_layer = shape[0] // L if name.startswith("pool") else None  # pools: layer l's slots are rows l(C+1)..
        if name in MUTABLE or name.startswith("pool16"):
            x = (torch.randn(shape, generator=g) * 1.5).to(fp)
        elif name.endswith(("_k", "_v")):  # packed codes: any byte is valid
            x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:  # fp16 scale / zero
            x = (torch.rand(shape, generator=g) * 0.1 + 0.01) if name.endswith("s") else torch.randn(shape, generator=g)
            x = x.half()
        if x.is_floating_point():  # unfilled slots are NaN (in a pool, of every layer)
            slots = x if per_layer is None else x.view(L, per_layer, *shape[1:]).transpose(0, 1)
            slots[filled[part]:] = float("nan")
        cache[name] = x
    q = torch.randn(1, t, HQ * D, generator=g) * 2.0  # the projection's rows, before RoPE
    k = torch.randn(1, t, H * D, generator=g) * 1.5
    v = torch.randn(1, t, H * D, generator=g)
    cos, sin = rope_cos_sin(p0 + torch.arange(t), D, 10000.0)
    state = torch.tensor([p0, *fills], dtype=torch.int32)
    return [q, k, v, cos, sin, state, *(cache[n] for n in MUTABLE), *(cache[n] for n in ref.POOL_NAMES)]


def reference(cfg, inputs):
    q, k, v, cos, sin, state, *rest = [x.clone() for x in inputs]
    bufs, pools = rest[:6], rest[6:]
    out, recv = ref.layer_attention(q, k, v, cos, sin, state, *bufs, pools, cfg[4], cfg[8], SCALE, cfg[5], cfg[6])
    return [out, recv, *bufs]


def cases(cfg):
    """(p0, T, fills) covering the boundaries of this layout."""
    sinks, window, _, caps, *_ = cfg
    t2 = min(3, window) if window else 3
    full = list(caps)
    over = [c + 5 for c in caps]
    mixed = [c // 2 + 1 for c in caps]
    out = [(0, 1, [0, 0, 0, 0]), (0, t2, [0, 0, 0, 0])]
    if sinks:
        out += [(sinks, 1, [0, 0, 0, 0]), (sinks - 1, t2, [0, 0, 0, 0])]  # sinks only; crossing into the window
    if window:
        out += [(sinks + window // 2, 1, [0, 0, 0, 0]), (sinks + window + 3, t2, mixed)]  # window only; wrapped
    out += [(sinks + window + 40, 1, full), (sinks + window + 41, t2, over), (sinks + window + 7, 2, mixed)]
    return out


@pytest.fixture(scope="module")
def programs(et_runtime):
    loaded = {}

    def get(name):
        if name not in loaded:
            cfg = CONFIGS[name]
            example = make_inputs(cfg, 0, 2, [0, 0, 0, 0], seed=0)
            dyn_t = torch.export.Dim("T", min=1, max=cfg[1] or T_MAX)
            dynamic = ({1: dyn_t},) * 3 + ({0: dyn_t},) * 2 + (None,) * 7 + ((None,) * len(ref.POOL_NAMES),)
            pte = export_et(LayerStep(cfg).eval(), tuple(example), dynamic=dynamic)
            assert ops.program_custom_ops(pte) == ["kvexport::layer_attention.out"]
            loaded[name] = (pte, et_runtime.load_program(pte).load_method("forward"))  # the bytes must outlive it
        return loaded[name][1]

    return get


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


def check_case(what, cfg, got, want):
    out, recv = got[0], got[1]
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an unfilled slot was read)"
    # fp32 on both sides, summed in other orders (8-wide AVX2 lanes vs torch): measured <= 2.3e-5
    torch.testing.assert_close(out, want[0], rtol=5e-5, atol=5e-5, msg=lambda m: f"{what}: out: {m}")
    torch.testing.assert_close(recv, want[1], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: recv: {m}")
    if not cfg[5]:
        assert not recv.any(), what
    for n, a, b in zip(MUTABLE, got[2:], want[2:]):
        assert torch.equal(_bits(a), _bits(b)), f"{what}: {n} differs at {(_bits(a) != _bits(b)).nonzero()[:4]}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_matches_reference(programs, name):
    cfg = CONFIGS[name]
    method = programs(name)
    for i, (p0, t, fills) in enumerate(cases(cfg)):
        inputs = make_inputs(cfg, p0, t, fills, seed=10 + i)
        check_case(f"{name} p0={p0} T={t} fills={fills}", cfg, method.execute(inputs), reference(cfg, inputs))


INPUT_NAMES = ("q", "k", "v", "cos", "sin", "state", *MUTABLE, *ref.POOL_NAMES)


def ort_session(cfg, layers):
    """An ONNX model of ``kvexport::layer_attention`` nodes, one per layer in ``layers`` (all reading and writing
    the same cache parts), in an ONNX Runtime session with our library. The returned function runs it on inputs
    bound in place (as the program runner binds them) and returns the last node's out, recv and staged rows, then
    the six parts as the kernels left them."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from kvexport.native_build import build_ort_library

    example = make_inputs(cfg, 0, 2, [0, 0, 0, 0], seed=0)
    types = {n: onnx.helper.np_dtype_to_tensor_dtype(x.numpy().dtype) for n, x in zip(INPUT_NAMES, example)}
    chunk_dim = {"q": 1, "k": 1, "v": 1, "cos": 0, "sin": 0}  # the dimension of size T
    shape = {n: ["T" if i == chunk_dim.get(n) else s for i, s in enumerate(x.shape)]
             for n, x in zip(INPUT_NAMES, example)}
    nodes, outs = [], []
    for i, layer in enumerate(layers):
        outs = [f"out{i}", f"recv{i}", f"evict_k_rows{i}", f"evict_v_rows{i}"]
        nodes.append(helper.make_node("layer_attention", list(INPUT_NAMES), outs, domain="kvexport", layer=layer,
                                      group=cfg[8], scale=SCALE, features=int(cfg[5]), rotate=int(cfg[6])))
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT if i < 2 else types["sink_k"], None)
               for i, n in enumerate(outs)]
    graph = helper.make_graph(nodes, "layer_attention", [helper.make_tensor_value_info(n, types[n], shape[n])
                                                         for n in INPUT_NAMES], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("kvexport", 1)],
                              ir_version=8)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(build_ort_library()))
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def run(inputs):
        arrays = [np.ascontiguousarray(x.numpy().copy()) for x in inputs]
        binding = session.io_binding()
        for name, a in zip(INPUT_NAMES, arrays):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(a))
        for name in outs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        got = [torch.from_numpy(x) for x in binding.copy_outputs_to_cpu()]
        return got, [torch.from_numpy(a) for a in arrays[6:12]]

    return run


def check_staged_rows(what, got_rows, parts, layer, t):
    for side, rows in enumerate(got_rows):
        assert torch.equal(_bits(rows), _bits(parts[4 + side][:t, layer])), f"{what}: staged rows {side}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ort_kernel_matches_reference(name):
    """The same cases through ONNX Runtime: out and recv returned, the six parts written in the input buffers."""
    cfg = CONFIGS[name]
    run = ort_session(cfg, [cfg[4]])
    for i, (p0, t, fills) in enumerate(cases(cfg)):
        what = f"ort {name} p0={p0} T={t} fills={fills}"
        inputs = make_inputs(cfg, p0, t, fills, seed=10 + i)
        got, parts = run(inputs)
        check_case(what, cfg, [*got[:2], *parts], reference(cfg, inputs))
        check_staged_rows(what, got[2:], parts, cfg[4], t)


def test_ort_layers_share_the_parts():
    """Two layers' kernels on the same buffers, in place: each touches only its own layer's rows, so in any order
    the buffers end as the reference applied for layer 0 then layer 1."""
    cfg = CONFIGS["fp16-s4-w8"]
    inputs = make_inputs(cfg, 4 + 8 + 3, 2, [3, 20, 2, 1], seed=5)
    first = reference((*cfg[:4], 0, *cfg[5:]), inputs)  # layer 0
    second = reference(cfg, [*inputs[:6], *first[2:], *inputs[12:]])  # then layer 1
    got, parts = ort_session(cfg, [0, 1])(inputs)
    check_case("ort two layers", cfg, [*got[:2], *parts], second)
    check_staged_rows("ort two layers", got[2:], parts, 1, 2)


def test_features_are_attention_weights(programs):
    """recv is a normalised attention mass: with one query row (T=1), the head-mean weights of all
    visible keys sum to the number of visible keys; here only the window's share is checked
    against the reference's, and the chunk token (seen by no later row) gets nothing."""
    cfg = CONFIGS["fp16-s4-w8"]
    inputs = make_inputs(cfg, 4 + 8 + 2, 1, [0, 0, 0, 0], seed=3)  # sinks + full window, empty pools
    recv = programs("fp16-s4-w8").execute(inputs)[1]
    assert recv.shape == (8 + 1, 3)
    assert float(recv[:8, 0].sum()) < 4 + 8 + 1 and float(recv[:8, 0].sum()) > 0
    assert torch.equal(recv[8], torch.zeros(3)) and torch.equal(recv[:8, 2], torch.ones(8))
