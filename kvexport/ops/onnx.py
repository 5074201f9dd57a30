"""ONNX translation of the kvexport ops: ONNX functions in the custom domain ``kvexport`` (opset
version 1) whose bodies are standard ONNX (opset 18) ops, so stock ONNX Runtime runs them with no
extra library; and ``kvexport::layer_attention`` (``torch.ops.kvexport.layer_attention_onnx``), which has
no body: our ONNX Runtime library (``libkvexport_ort.so``, :func:`kvexport.native_build.build_ort_library`)
runs it, writing the cache parts it is given in place.

Export (``kvexport.export.onnx``) uses :func:`node_translation_table`: each op becomes one
``kvexport::<op>`` node (schemas registered with ``onnx.defs``) and :func:`function_protos` (the ops'
bodies and the helper functions they call) are attached as the model's local functions.

Bit-exactness of ``quantize_pack`` with :mod:`kvexport.kv.quant`: the same fp32 ops in the same
order (ONNX ``Round`` is round-half-to-even like ``torch.round``). Packing avoids bit shifts
(torch.onnx's own uint8 shift translation emits a type-inconsistent BitwiseOr that ORT rejects):
codes are combined with integer Mul/ReduceSum and split with integer Div/Mod.
"""

from __future__ import annotations

import onnxscript
from onnxscript import FLOAT, FLOAT16, INT64, UINT8
from onnxscript import opset18 as op

DOMAIN = "kvexport"
VERSION = 1
ONNX_OPSET = 18  # torch.onnx builds its graph at opset 18 (TORCHLIB_OPSET) before converting

kvexport_opset = onnxscript.values.Opset(DOMAIN, VERSION)

NEG = -1.0e30  # == kvexport.kv.attention.NEG
FP16_NUDGE = 2.0**-10  # == kvexport.kv.quant.FP16_NUDGE
FP16_TINY = 2.0**-24  # == kvexport.kv.quant.FP16_TINY


@onnxscript.script(kvexport_opset, default_opset=op)
def quantize_pack(x: FLOAT, bits: int, group: int, clip: float = 1.0) -> tuple[UINT8, FLOAT16, FLOAT16]:
    """kvexport::quantize_pack == kvexport.kv.quant.quantize_packed."""
    b = op.Constant(value_int=bits)
    g1 = op.Reshape(op.Constant(value_int=group), op.Constant(value_ints=[1]))
    qmax_i = op.Sub(op.Pow(op.Constant(value_int=2), b), op.Constant(value_int=1))
    qmax = op.Cast(qmax_i, to=1)
    lead = op.Shape(x, end=-1)
    d = op.Shape(x, start=-1)
    ng = op.Div(d, g1)
    xg = op.Reshape(x, op.Concat(lead, ng, g1, axis=0))
    lo = op.ReduceMin(xg, op.Constant(value_ints=[-1]), keepdims=0)
    hi = op.ReduceMax(xg, op.Constant(value_ints=[-1]), keepdims=0)
    # clipping (quant.clip_shrink): a = (1 - clip) / 2 in fp32
    a = op.Div(op.Sub(op.Constant(value_float=1.0), op.Constant(value_float=clip)), op.Constant(value_float=2.0))
    clipped = op.Not(op.Equal(a, op.Constant(value_float=0.0)))  # shrink 0: min and max untouched
    cut = op.Mul(op.Sub(hi, lo), a)
    lo = op.Where(clipped, op.Add(lo, cut), lo)
    hi = op.Where(clipped, op.Sub(hi, cut), hi)
    axis_last = op.Constant(value_ints=[-1])
    nudge = op.Constant(value_float=FP16_NUDGE)
    tiny = op.Constant(value_float=FP16_TINY)
    # zero = fp16(lo - (|lo| * 2**-10 + 2**-24)); scale = fp16(span + (span * 2**-10 + 2**-24))
    z16 = op.Cast(op.Sub(lo, op.Add(op.Mul(op.Abs(lo), nudge), tiny)), to=10)
    zf = op.Cast(z16, to=1)
    span = op.Div(op.Sub(hi, zf), qmax)
    s16 = op.Cast(op.Add(span, op.Add(op.Mul(span, nudge), tiny)), to=10)
    sf = op.Cast(s16, to=1)

    step = op.Where(op.Greater(sf, op.Constant(value_float=0.0)), sf, op.Constant(value_float=1.0))
    q = op.Div(op.Sub(xg, op.Unsqueeze(zf, axis_last)), op.Unsqueeze(step, axis_last))
    codes = op.Cast(op.Clip(op.Round(q), op.Constant(value_float=0.0), qmax), to=7)

    # pack: 8/bits codes per byte, code i in bits [bits*i, bits*(i+1)) -> sum(code_i * 2**(bits*i))
    per = op.Div(op.Constant(value_int=8), b)
    weights = op.Pow(
        op.Constant(value_int=2), op.Mul(b, op.Range(op.Constant(value_int=0), per, op.Constant(value_int=1)))
    )
    lanes = op.Reshape(
        codes, op.Concat(lead, op.Constant(value_ints=[-1]), op.Reshape(per, op.Constant(value_ints=[1])), axis=0)
    )
    packed = op.Cast(op.ReduceSum(op.Mul(lanes, weights), axis_last, keepdims=0), to=2)
    return packed, s16, z16


@onnxscript.script(kvexport_opset, default_opset=op)
def dequantize(packed: UINT8, scale: FLOAT16, zero: FLOAT16, d: INT64, group: int) -> FLOAT:
    """kvexport.kv.quant.dequantize_packed of rows ``[..., d*bits/8]``; ``d`` int64 ``[1]`` (head_dim), the
    bits follow from the packed width. Unpacking is one lookup: a table of the codes (as floats) of each of the
    256 byte values ``[256, 8/bits]`` (256 rows, computed once a call), gathered by byte, costs two passes over
    the codes where integer Div/Mod per code cost four (the pools' dequantization is the portable program's
    largest cost at long context)."""
    g1 = op.Reshape(op.Constant(value_int=group), op.Constant(value_ints=[1]))
    axis_last = op.Constant(value_ints=[-1])
    per = op.Div(d, op.Shape(packed, start=-1))  # codes per byte = 8 / bits
    b = op.Div(op.Constant(value_ints=[8]), per)
    weights = op.Pow(
        op.Constant(value_int=2),
        op.Mul(b, op.Range(op.Constant(value_int=0), op.Squeeze(per), op.Constant(value_int=1))),
    )
    byte_values = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=256), op.Constant(value_int=1)),
                               axis_last)
    table = op.Cast(op.Mod(op.Div(byte_values, weights), op.Pow(op.Constant(value_int=2), b)), to=1)  # [256, per]
    lanes = op.Gather(table, op.Cast(packed, to=6), axis=0)  # [..., bytes, per] codes as floats
    lead = op.Shape(packed, end=-1)
    ng = op.Div(d, g1)
    cg = op.Reshape(lanes, op.Concat(lead, ng, g1, axis=0))
    xg = op.Add(
        op.Mul(cg, op.Unsqueeze(op.Cast(scale, to=1), axis_last)), op.Unsqueeze(op.Cast(zero, to=1), axis_last)
    )
    return op.Reshape(xg, op.Concat(lead, d, axis=0))


@onnxscript.script(kvexport_opset, default_opset=op)
def pool_attention(
    q: FLOAT,
    k_packed: UINT8,
    k_scale: FLOAT16,
    k_zero: FLOAT16,
    v_packed: UINT8,
    v_scale: FLOAT16,
    v_zero: FLOAT16,
    n_valid: INT64,
    bits: int,
    group: int,
    scale: float,
) -> tuple[FLOAT, FLOAT, FLOAT]:
    """kvexport::pool_attention == kvexport.kv.attention.pool_attention; reads only slots
    [0, max(n_valid, 1)) of the pools (slot 0 is masked out when n_valid == 0). Each side's bits follow
    from its packed width (values may be coarser than keys); ``bits`` (the keys') is kept for the schema."""
    zero1 = op.Constant(value_ints=[0])
    nv = op.Reshape(n_valid, op.Constant(value_ints=[1]))
    end = op.Max(nv, op.Constant(value_ints=[1]))
    d = op.Shape(q, start=-1)
    # K and V of the filled prefix, dequantized: [n, Hkv, D]
    k = dequantize(
        op.Slice(k_packed, zero1, end, zero1), op.Slice(k_scale, zero1, end, zero1),
        op.Slice(k_zero, zero1, end, zero1), d, group=group,
    )
    v = dequantize(
        op.Slice(v_packed, zero1, end, zero1), op.Slice(v_scale, zero1, end, zero1),
        op.Slice(v_zero, zero1, end, zero1), d, group=group,
    )
    # GQA: query head h reads KV head h // (Hq // Hkv)  ->  q as [Hkv, G*R, D]
    hkv = op.Shape(k_packed, start=1, end=2)
    q_shape = op.Shape(q)
    qg = op.Reshape(q, op.Concat(hkv, op.Constant(value_ints=[-1]), op.Shape(q, start=2), axis=0))
    s = op.Mul(op.MatMul(qg, op.Transpose(k, perm=[1, 2, 0])), op.Constant(value_float=scale))  # [Hkv, GR, n]
    n = op.Squeeze(op.Shape(k, start=0, end=1), zero1)
    mask = op.Less(op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1)), nv)  # [n]
    s = op.Where(mask, s, op.Constant(value_float=NEG))
    axis_last = op.Constant(value_ints=[-1])
    m = op.ReduceMax(s, axis_last, keepdims=1)
    p = op.Mul(op.Exp(op.Sub(s, m)), op.Cast(mask, to=1))
    l = op.ReduceSum(p, axis_last, keepdims=0)
    o = op.MatMul(p, op.Transpose(v, perm=[1, 0, 2]))  # [Hkv, GR, D]
    ml_shape = op.Shape(q, end=2)
    return op.Reshape(o, q_shape), op.Reshape(m, ml_shape), op.Reshape(l, ml_shape)


FUNCTIONS = {
    "quantize_pack": quantize_pack,
    "pool_attention": pool_attention,
}
HELPERS = (dequantize,)  # local functions the op bodies call


# Signatures of the ops as ONNX schemas (inputs, outputs, attributes; a type letter of _TYPES each). Registering
# them lets the exporter emit plain ``kvexport::<op>`` nodes, which its version-conversion pass leaves alone
# (it inlines functions, not nodes of other domains); for the two function ops :func:`function_protos` then become
# the model's local functions, so the ops stay visible as calls and stock ONNX Runtime runs the bodies. The
# library ops (LIBRARY_OPS) have no body: our ONNX Runtime library runs them.
_SCHEMAS = {
    "quantize_pack": (
        [("x", "F")], [("packed", "U"), ("scale", "H"), ("zero", "H")], {"bits": "INT", "group": "INT", "clip": "FLOAT"}
    ),
    "pool_attention": (
        [
            ("q", "F"),
            ("k_packed", "U"),
            ("k_scale", "H"),
            ("k_zero", "H"),
            ("v_packed", "U"),
            ("v_scale", "H"),
            ("v_zero", "H"),
            ("n_valid", "I"),
        ],
        [("o", "F"), ("m", "F"), ("l", "F")],
        {"bits": "INT", "group": "INT", "scale": "FLOAT"},
    ),
    "allocate": ([("desired", "I"), ("valid", "B"), ("fill", "I"), ("caps", "I")],
                 [("cls", "I"), ("slot", "I"), ("fill_out", "I")], {}),
    "block_offset": ([("y", "F"), ("x", "F"), ("offsets", "O")], [("out", "F")], {}),
}
_TYPES = {"F": ["tensor(float)"], "H": ["tensor(float16)"], "U": ["tensor(uint8)"], "I": ["tensor(int64)"],
          "B": ["tensor(bool)"], "O": ["tensor(float)", "tensor(float16)"]}

# kvexport::layer_attention (library op, no body): inputs q, k, v, cos, sin, state, the parts it writes in place,
# the pools; outputs out, recv and the layer's staged K and V rows. Each input and output has its own type variable
# (float parts may be fp16 or fp32; pools mix codes and scales), checked by the kernel.
LIBRARY_OP = "layer_attention"
# kvexport::allocate (library op, no body): the overflow rule (kvexport.kv.allocate), desired int64 [N], valid bool [N],
# fill / caps int64 [K] -> class, slot int64 [N], new fill int64 [K]
ALLOCATE_OP = "allocate"
# kvexport::block_offset (library op, no body): y [.., N] + block sums of x [.., K] (blocks of 32) @ offsets [K/32, N]
# (fp32, or fp16 where exact),
# the second term of an exact Q4_1 linear in --ops fused programs (kvexport.export.onnx_q4)
BLOCK_OFFSET_OP = "block_offset"
LIBRARY_OPS = (LIBRARY_OP, ALLOCATE_OP, BLOCK_OFFSET_OP)  # what libkvexport_ort.so runs


def _layer_attention_schema():
    from onnx.defs import OpSchema

    from kvexport.kv.layer_attention import POOL_NAMES, WRITTEN_PARTS

    ins = ["q", "k", "v", "cos", "sin", "state", *WRITTEN_PARTS, *POOL_NAMES]
    outs = ["out", "recv", "evict_k_rows", "evict_v_rows"]
    any_type = ["tensor(float)", "tensor(float16)", "tensor(uint8)", "tensor(int32)"]
    params = [(f"I{i}", n) for i, n in enumerate(ins)] + [(f"O{i}", n) for i, n in enumerate(outs)]
    return OpSchema(
        LIBRARY_OP,
        DOMAIN,
        VERSION,
        inputs=[OpSchema.FormalParameter(n, t) for t, n in params[: len(ins)]],
        outputs=[OpSchema.FormalParameter(n, t) for t, n in params[len(ins):]],
        type_constraints=[(t, any_type, "") for t, _ in params],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("layer", "group", "features", "rotate")]
        + [OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")],
    )


def register_schemas() -> None:
    """Register the ``kvexport`` domain's op schemas with ``onnx.defs`` (once per process)."""
    from onnx import defs
    from onnx.defs import OpSchema

    for name, (ins, outs, attrs) in _SCHEMAS.items():
        if defs.has(name, DOMAIN):
            continue
        used = sorted({t for _, t in ins + outs})
        defs.register_schema(
            OpSchema(
                name,
                DOMAIN,
                VERSION,
                inputs=[OpSchema.FormalParameter(n, f"T{t}") for n, t in ins],
                outputs=[OpSchema.FormalParameter(n, f"T{t}") for n, t in outs],
                type_constraints=[(f"T{t}", _TYPES[t], "") for t in used],
                attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, k), "") for a, k in attrs.items()],
            )
        )
    if not defs.has(LIBRARY_OP, DOMAIN):
        defs.register_schema(_layer_attention_schema())


def node_translation_table() -> dict:
    """``custom_translation_table`` entries that emit one ``kvexport::<op>`` node per call (attach
    :func:`function_protos` to the exported model so runtimes find the bodies)."""
    import torch
    from onnx import defs
    from onnxscript.values import Op

    from kvexport import ops

    ops.load()
    register_schemas()
    node = {name: Op(kvexport_opset, name, defs.get_schema(name, VERSION, DOMAIN))
            for name in (*FUNCTIONS, LIBRARY_OP, ALLOCATE_OP)}

    # One typed translation per op: torch.onnx binds the ATen arguments to these signatures.
    def quantize_pack_node(x, bits: int, group: int, clip: float = 1.0):
        return node["quantize_pack"](x, bits=bits, group=group, clip=clip)

    def pool_attention_node(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits: int, group: int, scale: float
    ):
        return node["pool_attention"](
            q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits=bits, group=group, scale=scale
        )

    def layer_attention_node(q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, pools,
                             layer: int, group: int, scale: float, features: bool, rotate: int):
        return node[LIBRARY_OP](q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, *pools,
                                layer=layer, group=group, scale=scale, features=int(features), rotate=int(rotate))

    def allocate_node(desired, valid, fill, caps):
        return node[ALLOCATE_OP](desired, valid, fill, caps)

    return {
        torch.ops.kvexport.layer_attention_onnx.default: layer_attention_node,
        torch.ops.kvexport.allocate.default: allocate_node,
        torch.ops.kvexport.quantize_pack.default: quantize_pack_node,
        torch.ops.kvexport.pool_attention.default: pool_attention_node,
    }


def function_protos() -> list:
    """The ``onnx.FunctionProto`` bodies of the ops and of the helpers they call (domain ``kvexport``,
    version 1)."""
    return [fn.to_function_proto() for fn in (*FUNCTIONS.values(), *HELPERS)]
