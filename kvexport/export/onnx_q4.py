"""``--weights q4`` for the onnx / ort targets: the GGUF's codes in ``com.microsoft::MatMulNBits``, exactly.

An exported program's constant-weight ``MatMul(A, W)`` (``W`` ``[K, N]`` initializer, ``K`` a multiple
of 32) is rewritten when ``Wᵀ`` holds exact codes (:mod:`kvexport.models.q4`, :mod:`kvexport.models.tied`):

* Q4_1 (the block linears): ``w = d·q + m = d·(q − z) + (m + z·d)`` per block of 32 with the integer
  ``z`` of :func:`kvexport.models.q4.onnx_zero_points`, so ``MatMulNBits(bits=4, block_size=32)`` with codes
  ``q`` (0..15, two per byte, element ``2i`` in the low nibble), scales ``d`` and packed uint8 zero points
  ``z``, plus ``MatMul(MatMul(x, block indicator [K, K/32]), (m + z·d)ᵀ [K/32, N])`` in fp32 — in a program
  that runs with our custom-op library (``--ops fused``) one ``kvexport::block_offset(y, x, offsets)`` node
  instead of those two MatMuls and the Add (240 nodes fewer on the default model; the same fp32 arithmetic,
  block sums then a sum over blocks), with the offsets stored in fp16 where a linear's all are exact: every
  one of the default model's 3.3M (``|m + z·d| <= d/2`` is a multiple of the finer of ``m``'s and ``d``'s fp16
  steps, so 11 bits hold it; a block whose range excludes 0 clamps ``z`` and may not be): 13 -> 6.6 MB a step.
  Float zero points ``−m/d`` in the MatMulNBits itself would need no second product, but ONNX Runtime 1.32
  has no fast kernel for them: one 576 x 1536 product took 1.11 ms against 0.075 ms with uint8 zero points
  (2 threads).
* Q8_0 (the tied lm_head): ``MatMulNBits(bits=8, block_size=32)`` with codes ``q + 128`` (uint8), scales ``d``
  and packed uint8 zero points 128. Its ``[N, K/32, 32]`` code initializer is row for row the embedding
  table, so the embedding ``Gather`` is rewritten to read it too (``Gather`` codes and scales,
  ``(codes − 128)·d`` in fp32): the table is stored once.

Every MatMulNBits runs at ``accuracy_level`` 4: the input quantized per block of 32 to int8, exact integer
block products, llama.cpp's arithmetic for Q4_1 / Q8_0 weights; the reference applies it
(:class:`kvexport.models.q4.Q4Int8Linear`, :func:`kvexport.models.tied.q8_0_linear`; measured against ONNX
Runtime on real rows: within 7.2e-7 of it relative to the largest output, 4-bit; 5.8e-7, 8-bit). At level 0
(fp32 input) ONNX Runtime 1.32 is slower: 0.075 against 0.051 ms for a 576 x 1536 4-bit product, and with no
fast 8-bit kernel, 146 ms a step against 1.8 ms for the 576 x 49,152 head; the default model's program decoded
at 15.2 against 12.8 ms per token with its 4-bit linears at level 0 (128 tokens, 2 threads). MatMuls whose
weights are not exact codes stay fp32; a model with no Q4_1 linear at all (safetensors) is refused by the
build (:func:`kvexport.export.ort_tools.quantize_weights`), not re-quantized.
"""

from __future__ import annotations

import numpy as np
import torch

from kvexport.export.onnx_graph import GraphIndex, replace_nodes
from kvexport.models.q4 import BLOCK, block_ones, onnx_zero_points, q4_1_codes
from kvexport.models.tied import q8_0_codes
from kvexport.ops.onnx import BLOCK_OFFSET_OP, DOMAIN

Q4_CONTRIB = "com.microsoft"


def _nbits_node(helper, a: str, out: str, name: str, k: int, n: int, bits: int, inputs: list[str]):
    return helper.make_node("MatMulNBits", [a, *inputs], [out], name=name, domain=Q4_CONTRIB,
                            K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=4)


def rewrite(model, keep: list[str] = (), library: bool = False) -> dict:
    """Rewrite ``model`` (``onnx.ModelProto``, initializers loaded) in place, all MatMuls but those named in
    ``keep``; ``library``: block offsets as ``kvexport::block_offset`` nodes. Returns counts for the manifest:
    ``{"q4_1": n, "q8_0": n, "fp32": n, "embedding_shared": bool}``."""
    from onnx import helper, numpy_helper

    graph = model.graph
    index = GraphIndex(graph)
    inits = index.inits
    counts = {"q4_1": 0, "q8_0": 0, "fp32": 0, "embedding_shared": False}
    new_inits, drop, q8_tables, indicators, edits = [], set(), {}, set(), []
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
            z, offset = onnx_zero_points(d, m)  # [N, K/32]
            nibbles = torch.nn.functional.pad(z.to(torch.uint8), (0, (k // BLOCK) % 2))  # even count
            zp = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).numpy()  # block 2i in the low nibble
            bits, tensors = 4, [packed.numpy(), d.reshape(-1).numpy(), zp.reshape(-1)]
            offset = offset.T.contiguous().numpy()  # [K/32, N]
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
            offset = None
            counts["q8_0"] += 1
        names = [f"{node.input[1]}.q{bits}.{s}" for s in ("codes", "scales", "zero_points")]
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(t), name) for t, name in zip(tensors, names)]
        name = node.name or f"q4_{idx}"
        if offset is None:
            edits.append(([node], [_nbits_node(helper, node.input[0], node.output[0], name, k, n, bits, names)]))
        else:
            nodes, offset_inits = _block_offset(
                helper, numpy_helper, node.input[0], node.output[0], name, offset, None if library else indicators
            )
            nodes.insert(0, _nbits_node(helper, node.input[0], f"{name}.codes_part", name, k, n, bits, names))
            edits.append(([node], nodes))
            new_inits += offset_inits
        if len(index.consumers.get(node.input[1], ())) == 1:
            drop.add(node.input[1])
    replace_nodes(graph, edits)
    counts["embedding_shared"] = _share_embedding(graph, inits, q8_tables, drop, helper, numpy_helper)
    if (counts["q4_1"] or counts["q8_0"]) and all(o.domain != Q4_CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(Q4_CONTRIB, 1))
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return counts


def _block_offset(helper, numpy_helper, x: str, out: str, p: str, offsets: np.ndarray, indicators: set | None):
    """Nodes (after the MatMulNBits ``p``, whose output is ``<p>.codes_part``) that add ``block sums of the
    input x [.., K/32] @ offsets [K/32, N]`` and write ``out``, and their initializers. ``indicators``: names
    already added, or None for one ``kvexport::block_offset`` node (our library). Otherwise the block sums are a
    ``MatMul`` with the 0/1 indicator ``block_onesᵀ`` ``[K, K/32]`` (exact products; one node where ``Reshape`` +
    ``ReduceSum`` took four on a decode step)."""
    n_blocks = offsets.shape[0]
    offsets = np.ascontiguousarray(offsets, dtype=np.float32)
    if indicators is None:  # the library op also reads fp16 offsets: half the bytes where that is exact
        half = offsets.astype(np.float16)
        stored = half if np.array_equal(half.astype(np.float32), offsets) else offsets
        inits = [numpy_helper.from_array(stored, f"{p}.block_offsets")]
        return [helper.make_node(BLOCK_OFFSET_OP, [f"{p}.codes_part", x, f"{p}.block_offsets"], [out],
                                 domain=DOMAIN)], inits
    inits = [numpy_helper.from_array(offsets, f"{p}.block_offsets")]
    blocks = f"block_indicator.{n_blocks * BLOCK}"  # one per input width K
    if blocks not in indicators:
        inits.append(numpy_helper.from_array(block_ones(n_blocks * BLOCK).T.contiguous().numpy(), blocks))
        indicators.add(blocks)
    nodes = [
        helper.make_node("MatMul", [x, blocks], [f"{p}.block_sums"]),  # [..., K/32]
        helper.make_node("MatMul", [f"{p}.block_sums", f"{p}.block_offsets"], [f"{p}.offset_part"]),  # [..., N]
        helper.make_node("Add", [f"{p}.codes_part", f"{p}.offset_part"], [out]),
    ]
    return nodes, inits


def _share_embedding(graph, inits, q8_tables, drop, helper, numpy_helper) -> bool:
    """Point the embedding ``Gather(table [V, dim], ids)`` at the lm_head's Q8_0 codes when the
    head's weight is that table transposed; returns whether it did."""
    for src, (w, n, k) in q8_tables.items():
        for node in list(graph.node):
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
            replace_nodes(graph, [([node], nodes)])
            if not any(node.input[0] in nd.input for nd in graph.node):
                drop.add(node.input[0])
            return True
    return False
