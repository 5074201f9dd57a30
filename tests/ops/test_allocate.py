"""The overflow rule: the vectorised reference (kvexport.kv.allocate) against a plain loop written from its
docstring, and the ExecuTorch kernel ``kvexport::allocate`` (a real .pte) and the op of our ONNX Runtime library
(a real session) against the reference."""

from __future__ import annotations

import pytest
import torch

import kvexport.ops as ops
from kvexport.kv.allocate import allocate

K = 4  # classes


def loop_rule(desired, valid, fill, caps):
    """The rule for tokens one at a time: own class, nearest cheaper with room, nearest dearer."""
    fill = fill.tolist()
    cls, slot = [], []
    for d, ok in zip(desired.tolist(), valid.tolist()):
        order = [d] + list(range(d - 1, -1, -1)) + list(range(d + 1, K))
        placed = (-1, 0)
        if ok:
            for c in order:
                if fill[c] < caps[c]:
                    placed = (c, fill[c])
                    fill[c] += 1
                    break
        cls.append(placed[0])
        slot.append(placed[1])
    return cls, slot, fill


def cases(n_cases: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_cases):
        n = int(torch.randint(1, 40, (1,), generator=g))
        caps = torch.randint(0, 12, (K,), generator=g)
        fill = (torch.rand(K, generator=g) * (caps + 1)).long().clamp(max=caps)
        desired = torch.randint(0, K, (n,), generator=g)
        valid = torch.rand(n, generator=g) < 0.8
        yield desired, valid, fill, caps


def test_reference_places_tokens_by_the_documented_rule():
    for desired, valid, fill, caps in cases():
        cls, slot, new_fill = allocate(desired, valid, fill, caps)
        assert torch.all(cls[~valid] == -1)
        # every valid token finds a slot while any pool has room
        assert int((cls >= 0).sum()) == min(int(valid.sum()), int((caps - fill).sum()))
        for c in range(K):
            # a class's slots are its next free ones, each used once
            assert torch.equal(slot[cls == c].sort().values, torch.arange(int(fill[c]), int(new_fill[c])))
            # round 0: the first tokens (position order) asking for c get it, as many as it has room for
            asking = (valid & (desired == c)).nonzero().flatten()
            first = asking[: int(caps[c] - fill[c])]
            assert torch.all(cls[first] == c) and torch.equal(slot[first], fill[c] + torch.arange(len(first)))
        if desired.numel() == 1:  # one token (a decode step): its own class, nearest cheaper, nearest dearer
            assert (cls.tolist(), slot.tolist(), new_fill.tolist()) == loop_rule(desired, valid, fill, caps)


def test_single_tokens_follow_the_preference_order():
    caps = torch.tensor([2, 1, 0, 3])
    fill = torch.tensor([2, 0, 0, 1])
    expect = {0: 1, 1: 1, 2: 1, 3: 3}  # 2-bit full -> 4; 8-bit has no pool -> cheaper 4; 16 has room
    for d, c in expect.items():
        cls, slot, new_fill = allocate(torch.tensor([d]), torch.tensor([True]), fill, caps)
        assert int(cls) == c and int(slot) == int(fill[c]) and int(new_fill[c]) == int(fill[c]) + 1
    cls, _, new_fill = allocate(torch.tensor([2]), torch.tensor([False]), fill, caps)
    assert int(cls) == -1 and torch.equal(new_fill, fill)


class Allocate(torch.nn.Module):
    def forward(self, desired, valid, fill, caps):
        return ops.allocate(desired, valid, fill, caps)


@pytest.fixture(scope="module")
def allocate_method(et_runtime):
    from executorch.exir import to_edge

    ops.load()
    desired, valid, fill, caps = next(cases())
    n = torch.export.Dim("n", min=1, max=64)
    ep = torch.export.export(Allocate(), (desired, valid, fill, caps), dynamic_shapes=({0: n}, {0: n}, None, None))
    pte = to_edge(ep).to_executorch().buffer
    assert ops.program_custom_ops(pte) == ["kvexport::allocate.out"]
    yield et_runtime.load_program(pte).load_method("forward")
    del pte  # the runtime reads the program's bytes while its method runs: keep them alive until here


def test_kernel_equals_reference(allocate_method):
    for desired, valid, fill, caps in cases(300, seed=1):
        got = allocate_method.execute([desired, valid, fill, caps])
        want = allocate(desired, valid, fill, caps)
        for a, b, name in zip(got, want, ("class", "slot", "fill")):
            assert torch.equal(a, b), (name, desired.tolist(), valid.tolist(), fill.tolist(), caps.tolist(), a, b)


def test_onnx_runtime_op_equals_reference():
    """The same cases through one ``kvexport::allocate`` node of libkvexport_ort.so."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from kvexport.native_build import build_ort_library

    io = [("desired", TensorProto.INT64, ["n"]), ("valid", TensorProto.BOOL, ["n"]), ("fill", TensorProto.INT64, [K]),
          ("caps", TensorProto.INT64, [K])]
    outs = [("cls", ["n"]), ("slot", ["n"]), ("fill_out", [K])]
    graph = helper.make_graph(
        [helper.make_node("allocate", [n for n, *_ in io], [n for n, _ in outs], domain="kvexport")], "g",
        [helper.make_tensor_value_info(*x) for x in io],
        [helper.make_tensor_value_info(n, TensorProto.INT64, shape) for n, shape in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("kvexport", 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(build_ort_library()))
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for desired, valid, fill, caps in cases(300, seed=2):
        got = session.run(None, {n: x.numpy() for (n, *_), x in zip(io, (desired, valid, fill, caps))})
        want = allocate(desired, valid, fill, caps)
        for a, b, name in zip(got, want, ("class", "slot", "fill")):
            assert torch.equal(torch.from_numpy(a), b), (name, desired.tolist(), valid.tolist(), fill.tolist(), a, b)
