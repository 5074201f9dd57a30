"""Fold the exported graph's per-layer glue into ONNX Runtime's fused CPU ops (``com.microsoft``).

``torch.onnx`` writes RMSNorm and the rotary embedding as chains of small standard ops; on a
decode step (one token, a 576-wide hidden state) ONNX Runtime spends more in launching those nodes than in their
arithmetic. Two rewrites, each matched on the exact chain the exporter writes and skipped otherwise:

* **residual + RMSNorm**: ``s = Add(a, b)``; ``Mul(Mul(s, Reciprocal(Sqrt(Add(ReduceMean(Pow(s, 2), [-1]), eps)))),
  gamma)`` -> ``SkipSimplifiedLayerNormalization(a, b, gamma, epsilon=eps)`` whose 4th output is ``s`` (the
  residual stream the next block adds to). 9 nodes -> 1; the embedding's norm (no residual add) stays.
* **rotary embedding** (half-split, HF Llama): ``Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, D/2:)),
  Slice(x, :D/2)), sin))`` on ``x`` ``[B, H, T, D]`` -> ``RotaryEmbedding(x, position_ids, cos_cache,
  sin_cache)``. The caches ``[max_positions, D/2]`` are computed here the way the graph computes ``cos`` / ``sin``
  (``float32(position) · inv_freq`` in fp32, then cos / sin), from the graph's own ``inv_freq``. 7 nodes -> 1.

The arithmetic is the same up to fp32 rounding order (checked by ``kvexport parity`` on every program). Each op's
first ONNX Runtime release is in :data:`kvexport.export.ort_tools.CONTRIB_OPS`.
"""

from __future__ import annotations

import numpy as np

from kvexport.export.onnx_graph import GraphIndex, replace_nodes

CONTRIB = "com.microsoft"


def fuse(model, max_positions: int) -> dict:
    """Apply the rewrites to ``model`` (``onnx.ModelProto``, initializers loaded) in place; returns
    ``{"skip_rms_norm": n, "rotary": n}``."""
    from onnx import helper

    counts = {"skip_rms_norm": _fuse_norms(model, helper), "rotary": _fuse_rotary(model, helper, max_positions)}
    if any(counts.values()) and all(o.domain != CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return counts


def _fuse_norms(model, helper) -> int:
    g = GraphIndex(model.graph)
    matches = [m for m in map(lambda n: _match_norm(g, n), model.graph.node) if m]  # disjoint: private chains
    replace_nodes(model.graph, [
        (nodes, [helper.make_node("SkipSimplifiedLayerNormalization", [a, b, gamma], [out, "", "", s],
                                  name=f"{out}.skip_rms_norm", domain=CONTRIB, epsilon=eps)])
        for nodes, (a, b, gamma, eps, out, s) in matches])
    return len(matches)


def _match_norm(g: GraphIndex, scale):
    """``scale`` = ``Mul(Mul(s, rsqrt), gamma)`` with ``s = Add(a, b)``: (nodes, (a, b, gamma, eps, out, s))."""
    if scale.op_type != "Mul" or scale.domain or g.const(scale.input[1]) is None:
        return None
    gamma = g.const(scale.input[1])
    norm = g.op(scale.input[0], "Mul")
    if norm is None or gamma.ndim != 1 or not g.private(norm.output[0]):
        return None
    s, rsqrt = norm.input
    recip = g.op(rsqrt, "Reciprocal")
    sqrt = recip and g.op(recip.input[0], "Sqrt")
    add_eps = sqrt and g.op(sqrt.input[0], "Add")
    mean = add_eps and g.op(add_eps.input[0], "ReduceMean")
    pow_ = mean and g.op(mean.input[0], "Pow")
    residual = g.op(s, "Add")
    if not (pow_ and residual and pow_.input[0] == s):
        return None
    eps, two = g.const(add_eps.input[1]), g.const(pow_.input[1])
    axes = g.const(mean.input[1]) if len(mean.input) > 1 else None
    keep = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
    if eps is None or eps.size != 1 or two is None or two.size != 1 or float(two.reshape(-1)[0]) != 2.0:
        return None
    if axes is None or axes.reshape(-1).tolist() != [-1] or not keep:
        return None
    if any(g.const(i) is not None for i in residual.input):  # a residual stream: both summands computed
        return None
    chain = [pow_, mean, add_eps, sqrt, recip, norm]
    if not all(g.private(n.output[0]) for n in chain):
        return None
    return [residual, *chain, scale], (*residual.input, scale.input[1], float(eps.reshape(-1)[0]), scale.output[0], s)


def _fuse_rotary(model, helper, max_positions: int) -> int:
    from onnx import numpy_helper

    g = GraphIndex(model.graph)
    matches = [m for m in map(lambda n: _match_rotary(g, n), model.graph.node) if m]
    if not matches:
        return 0
    cos, sin = matches[0][1][1:]
    tables = _rotary_tables(g, cos, sin, max_positions)
    if tables is None or any(m[1][1:] != (cos, sin) or m[3] != tables[1].shape[1] for m in matches):
        return 0
    positions, cos_cache, sin_cache = tables
    model.graph.initializer.extend([numpy_helper.from_array(cos_cache, "rotary.cos_cache"),
                                    numpy_helper.from_array(sin_cache, "rotary.sin_cache"),
                                    numpy_helper.from_array(np.array([0], dtype=np.int64), "rotary.batch_axis")])
    ids = helper.make_node("Unsqueeze", [positions, "rotary.batch_axis"], ["rotary.position_ids"])  # [1, T]
    edits = [(nodes, [helper.make_node("RotaryEmbedding", [x, "rotary.position_ids", "rotary.cos_cache",
                                       "rotary.sin_cache"], [out], name=f"{out}.rotary", domain=CONTRIB,
                                       interleaved=0)]) for nodes, (x, _, _), out, _ in matches]
    edits[0][1].insert(0, ids)  # before the first rotary in graph order
    replace_nodes(model.graph, edits)
    return len(matches)


def _match_rotary(g: GraphIndex, add):
    """``add`` = ``Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h)), sin))`` on the last axis:
    (nodes, (x, cos, sin), out, h)."""
    if add.op_type != "Add" or add.domain:
        return None
    m1, m2 = g.op(add.input[0], "Mul"), g.op(add.input[1], "Mul")
    cat = m2 and g.op(m2.input[0], "Concat")
    if not (m1 and cat and len(cat.input) == 2):
        return None
    neg = g.op(cat.input[0], "Neg")
    hi = neg and g.op(neg.input[0], "Slice")
    lo = g.op(cat.input[1], "Slice")
    x = m1.input[0]
    if not (hi and lo and hi.input[0] == x and lo.input[0] == x):
        return None
    chain = [hi, neg, lo, cat, m1, m2]
    if not all(g.private(n.output[0]) for n in chain):
        return None
    (hi_start, _, hi_axis), (lo_start, lo_end, lo_axis) = _slice_args(g, hi), _slice_args(g, lo)
    if None in (hi_start, lo_end) or lo_start != 0 or hi_start != lo_end or {hi_axis, lo_axis} != {-1}:
        return None
    return [*chain, add], (x, m1.input[1], m2.input[1]), add.output[0], hi_start


def _slice_args(g: GraphIndex, node) -> tuple:
    """(start, end, axis) of a one-axis, step-1 ``Slice`` with constant arguments (axis -1 for the last of 4)."""
    args = [g.const(i) for i in node.input[1:]]
    if any(a is None or a.size != 1 for a in args):
        return None, None, None
    start, end, axis, *step = (int(a.reshape(-1)[0]) for a in args)
    if step and step[0] != 1:
        return None, None, None
    return start, end, -1 if axis in (-1, 3) else axis


def _rotary_tables(g: GraphIndex, cos: str, sin: str, max_positions: int):
    """(position value ``[T]`` int64, cos cache, sin cache ``[max_positions, D/2]``) when ``cos`` / ``sin`` are
    ``Cos`` / ``Sin`` of ``Concat(f, f)``, ``f = Mul(Unsqueeze(Cast(positions)), inv_freq)``; else None."""
    c, s = g.op(cos, "Cos"), g.op(sin, "Sin")
    cat = c and s and c.input[0] == s.input[0] and g.op(c.input[0], "Concat")
    if not (cat and len(cat.input) == 2 and cat.input[0] == cat.input[1]):
        return None
    freqs = g.op(cat.input[0], "Mul")
    unsq = freqs and g.op(freqs.input[0], "Unsqueeze")
    cast = unsq and g.op(unsq.input[0], "Cast")
    inv_freq = freqs and g.const(freqs.input[1])
    if not (cast and inv_freq is not None):
        return None
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.reshape(1, -1).astype(np.float32)
    return cast.input[0], np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
