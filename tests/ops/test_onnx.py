"""ONNX translation: the kvexport ops as onnxscript functions (domain kvexport, version 1) of
standard ops, exported through torch.onnx (dynamo) and run on stock ONNX Runtime (CPU)."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from kvops_testlib import (
    BITS,
    CLASSES,
    GROUP,
    HEADS,
    KvOps,
    R,
    assert_quant_identical,
    check_outputs,
    dynamic_shapes,
    make_inputs,
    stress_rows,
)
from onnx import TensorProto, helper

import kvexport.ops as ops
from kvexport.export.onnx import attach_kvexport_functions
from kvexport.kv import quant
from kvexport.ops import onnx as kv_onnx


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported():
    ops.load()
    hq, hkv = HEADS["gqa3"]
    program = torch.onnx.export(
        KvOps().eval(),
        make_inputs(16, hq, hkv, R, 9),
        dynamo=True,
        custom_translation_table=kv_onnx.node_translation_table(),
        opset_version=kv_onnx.ONNX_OPSET,
        dynamic_shapes=dynamic_shapes(),
        verbose=False,
    )
    attach_kvexport_functions(program.model)  # as the exporter does
    return program.model_proto


def test_torch_onnx_export_runs_on_ort(exported):
    ops_used = {(n.domain, n.op_type) for n in exported.graph.node}
    for fn in exported.functions:
        ops_used |= {(n.domain, n.op_type) for n in fn.node}
    assert all(domain in ("", "kvexport") for domain, _ in ops_used), ops_used
    assert not {t for _, t in ops_used} & {"BitShift", "BitwiseOr"}, ops_used
    sess = _session(exported)
    names = [i.name for i in sess.get_inputs()]
    hq, hkv = HEADS["gqa3"]
    for i, (n, nv) in enumerate([(1, 0), (7, 3), (64, 64), (257, 0), (257, 129), (2048, 1999)]):
        inputs = make_inputs(n, hq, hkv, R, nv, seed=50 + i)
        out = sess.run(None, {k: v.numpy() for k, v in zip(names, inputs)})
        check_outputs([torch.from_numpy(o) for o in out], inputs, CLASSES, GROUP, f"onnx N={n} n_valid={nv}")


def _function_model(name: str, inputs, outputs, attrs) -> onnx.ModelProto:
    """A model whose graph is one call to the kvexport function ``name`` (kept as a function)."""
    node = helper.make_node(name, [i.name for i in inputs], [o.name for o in outputs], domain=kv_onnx.DOMAIN, **attrs)
    graph = helper.make_graph([node], name, inputs, outputs)
    return helper.make_model(
        graph,
        functions=kv_onnx.function_protos(),
        ir_version=10,
        opset_imports=[
            helper.make_opsetid("", kv_onnx.ONNX_OPSET),
            helper.make_opsetid(kv_onnx.DOMAIN, kv_onnx.VERSION),
        ],
    )


@pytest.mark.parametrize("bits", BITS)
def test_functions_kept_as_functions_bit_exact(bits):
    """The FunctionProtos themselves, called from a graph in domain kvexport: checker passes and
    ORT output is bit-identical to the reference on corner-case data (groups 8/32/64)."""
    vi = helper.make_tensor_value_info
    x = stress_rows(600, seed=bits)
    for group, clip in ((8, 1.0), (32, 1.0), (64, 1.0), (32, 0.7), (64, 0.65)):
        qmodel = _function_model(
            "quantize_pack",
            [vi("x", TensorProto.FLOAT, ["n", 4, 64])],
            [
                vi("p", TensorProto.UINT8, ["n", 4, 64 * bits // 8]),
                vi("s", TensorProto.FLOAT16, ["n", 4, 64 // group]),
                vi("z", TensorProto.FLOAT16, ["n", 4, 64 // group]),
            ],
            {"bits": bits, "group": group, "clip": clip},
        )
        p, s, z = _session(qmodel).run(None, {"x": x.numpy()})
        ref = quant.quantize_packed(x, bits, group, clip)
        assert_quant_identical((torch.from_numpy(p), torch.from_numpy(s), torch.from_numpy(z)), ref,
                               f"onnx bits={bits} group={group} clip={clip}")
