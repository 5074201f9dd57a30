"""``--weights q4`` for the onnx / ort targets: the GGUF's codes in ``com.microsoft::MatMulNBits``, exactly.

An exported program's constant-weight ``MatMul(A, W)`` (``W`` ``[K, N]`` initializer, ``K`` a multiple
of 32) is rewritten when ``Wᵀ`` holds exact codes (:mod:`kvexport.models.q4`, :mod:`kvexport.models.tied`):

* Q4_1 (the block linears): ``MatMulNBits(bits=4, block_size=32)`` with codes ``q`` (0..15, two per
  byte, element ``2i`` in the low nibble), scales ``d`` and float zero points ``zp = −m/d``, so
  ORT's ``(q − zp)·d = d·q + m`` up to fp32 rounding;
* Q8_0 (the tied lm_head): ``MatMulNBits(bits=8, block_size=32)`` with codes ``q + 128`` (uint8),
  scales ``d`` and packed uint8 zero points 128: exact. Its ``[N, K/32, 32]`` code initializer is
  row for row the embedding table, so the embedding ``Gather`` is rewritten to read it too
  (``Gather`` codes and scales, ``(codes − 128)·d`` in fp32): the table is stored once.

``accuracy_level`` 0: ORT keeps fp32 activations (no int8 activation quantization). MatMuls whose
weights are not exact codes stay fp32; a model with no Q4_1 linear at all (safetensors) is refused
by the build (:func:`kvexport.export.ort_tools.quantize_weights`), not re-quantized.
"""

from __future__ import annotations

import numpy as np
import torch

from kvexport.models.q4 import BLOCK, q4_1_codes
from kvexport.models.tied import q8_0_codes

Q4_CONTRIB = "com.microsoft"


def _nbits_node(helper, a: str, out: str, name: str, k: int, n: int, bits: int, inputs: list[str]):
    return helper.make_node("MatMulNBits", [a, *inputs], [out], name=name, domain=Q4_CONTRIB,
                            K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=0)


def rewrite(model, keep: list[str] = ()) -> dict:
    """Rewrite ``model`` (``onnx.ModelProto``, initializers loaded) in place, all MatMuls but those named in
    ``keep``; returns counts for the manifest: ``{"q4_1": n, "q8_0": n, "fp32": n, "embedding_shared": bool}``."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    counts = {"q4_1": 0, "q8_0": 0, "fp32": 0, "embedding_shared": False}
    new_inits, drop, q8_tables = [], set(), {}
    for idx, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or node.domain or node.input[1] not in inits or node.name in keep:
            continue
        w = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())  # [K, N]
        if w.dim() != 2 or w.shape[0] % BLOCK or w.dtype != torch.float32:
            continue
        k, n = w.shape
        codes, d, m, exact = q4_1_codes(w.T)  # [N, K], [N, K/32]
        if exact and bool((d > 0).all()):
            packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // BLOCK, BLOCK // 2)
            zp = -m / d
            bits, tensors = 4, [packed.numpy(), d.reshape(-1).numpy(), zp.reshape(-1).numpy()]
            counts["q4_1"] += 1
        else:
            q8, d8, exact8 = q8_0_codes(w.T)
            if not exact8:
                counts["fp32"] += 1
                continue
            table = (q8.to(torch.int16) + 128).to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
            zp8 = np.full(n * (k // BLOCK), 128, dtype=np.uint8)
            bits, tensors = 8, [table.numpy(), d8.reshape(-1).numpy(), zp8]
            q8_tables[node.input[1]] = (w, n, k)
            counts["q8_0"] += 1
        names = [f"{node.input[1]}.q{bits}.{s}" for s in ("codes", "scales", "zero_points")]
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(t), name) for t, name in zip(tensors, names)]
        graph.node.remove(node)
        graph.node.insert(idx, _nbits_node(helper, node.input[0], node.output[0], node.name or f"q4_{idx}",
                                           k, n, bits, names))
        if consumers.get(node.input[1]) == 1:
            drop.add(node.input[1])
    counts["embedding_shared"] = _share_embedding(graph, inits, q8_tables, drop, helper, numpy_helper)
    if (counts["q4_1"] or counts["q8_0"]) and all(o.domain != Q4_CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(Q4_CONTRIB, 1))
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return counts


def _share_embedding(graph, inits, q8_tables, drop, helper, numpy_helper) -> bool:
    """Point the embedding ``Gather(table [V, dim], ids)`` at the lm_head's Q8_0 codes when the
    head's weight is that table transposed; returns whether it did."""
    for src, (w, n, k) in q8_tables.items():
        for idx, node in enumerate(list(graph.node)):
            if node.op_type != "Gather" or node.domain or node.input[0] not in inits:
                continue
            table = numpy_helper.to_array(inits[node.input[0]])
            if table.shape != (n, k) or not np.array_equal(table, w.T.numpy()):
                continue
            codes, scales = f"{src}.q8.codes", f"{src}.q8.scales"
            ids, out, p = node.input[1], node.output[0], f"{node.name or 'embed'}.q8"
            shape = f"{p}.scale_shape"
            graph.initializer.append(numpy_helper.from_array(np.array([n, k // BLOCK, 1], dtype=np.int64), shape))
            graph.initializer.append(numpy_helper.from_array(np.array([128.0], dtype=np.float32), f"{p}.zero"))
            graph.initializer.append(numpy_helper.from_array(np.array([k], dtype=np.int64), f"{p}.dim"))
            nodes = [
                helper.make_node("Gather", [codes, ids], [f"{p}.rows"], axis=0),  # [..., K/32, 32] uint8
                helper.make_node("Cast", [f"{p}.rows"], [f"{p}.rows_f"], to=1),
                helper.make_node("Sub", [f"{p}.rows_f", f"{p}.zero"], [f"{p}.centred"]),
                helper.make_node("Reshape", [scales, shape], [f"{p}.scales3"]),  # [V, K/32, 1]
                helper.make_node("Gather", [f"{p}.scales3", ids], [f"{p}.s"], axis=0),  # [..., K/32, 1]
                helper.make_node("Mul", [f"{p}.centred", f"{p}.s"], [f"{p}.x"]),  # [..., K/32, 32]
                helper.make_node("Shape", [ids], [f"{p}.ids_shape"]),
                helper.make_node("Concat", [f"{p}.ids_shape", f"{p}.dim"], [f"{p}.out_shape"], axis=0),
                helper.make_node("Reshape", [f"{p}.x", f"{p}.out_shape"], [out]),  # [..., K]
            ]
            graph.node.remove(node)
            for j, new in enumerate(nodes):
                graph.node.insert(idx + j, new)
            if not any(node.input[0] in nd.input for nd in graph.node):
                drop.add(node.input[0])
            return True
    return False
