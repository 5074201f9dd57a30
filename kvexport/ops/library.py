"""torch.library definitions of the ``kvexport`` custom ops (export side; pure Python).

Each op has a functional overload and an ``.out`` overload (ExecuTorch's ``to_executorch`` swaps
the former for the latter). The eager CPU implementations call the reference functions in
:mod:`kvexport.kv.quant` / :mod:`kvexport.kv.attention` (``q8_linear``: :mod:`kvexport.models.tied`), so there
is exactly one reference; the fake (meta) implementations give shapes and dtypes for ``torch.export``.

Importing this module does not register anything; :func:`kvexport.ops.load` does (once).
"""

from __future__ import annotations

import torch

from kvexport.kv import allocate, attention, layer_attention, quant
from kvexport.models import tied

NAMESPACE = "kvexport"

SCHEMAS = {
    "quantize_pack": (
        "quantize_pack(Tensor x, int bits, int group, float clip=1.0) -> (Tensor packed, Tensor scale, Tensor zero)"
    ),
    "quantize_pack.out": (
        "quantize_pack.out(Tensor x, int bits, int group, float clip=1.0, *, Tensor(a!) packed, Tensor(b!) scale,"
        " Tensor(c!) zero) -> (Tensor(a!), Tensor(b!), Tensor(c!))"
    ),
    "pool_attention": (
        "pool_attention(Tensor q, Tensor k_packed, Tensor k_scale, Tensor k_zero, Tensor v_packed, Tensor v_scale,"
        " Tensor v_zero, Tensor n_valid, int bits, int group, float scale) -> (Tensor o, Tensor m, Tensor l)"
    ),
    "pool_attention.out": (
        "pool_attention.out(Tensor q, Tensor k_packed, Tensor k_scale, Tensor k_zero, Tensor v_packed,"
        " Tensor v_scale, Tensor v_zero, Tensor n_valid, int bits, int group, float scale, *, Tensor(a!) o,"
        " Tensor(b!) m, Tensor(c!) l) -> (Tensor(a!), Tensor(b!), Tensor(c!))"
    ),
    "layer_attention": (
        "layer_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor state,"
        " Tensor(a!) sink_k, Tensor(b!) sink_v,"
        " Tensor(c!) win_k, Tensor(d!) win_v, Tensor(e!) evict_k, Tensor(f!) evict_v, Tensor[] pools, int layer,"
        " int group, float scale, bool features, int rotate) -> (Tensor out, Tensor recv)"
    ),
    "layer_attention.out": (
        "layer_attention.out(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor state,"
        " Tensor(a!) sink_k, Tensor(b!) sink_v,"
        " Tensor(c!) win_k, Tensor(d!) win_v, Tensor(e!) evict_k, Tensor(f!) evict_v, Tensor[] pools, int layer,"
        " int group, float scale, bool features, int rotate, *, Tensor(g!) out, Tensor(h!) recv)"
        " -> (Tensor(g!), Tensor(h!))"
    ),
    # The ONNX form of layer_attention (kvexport.ops.layer_attention, onnx=True): declared without mutation, so
    # an exported graph stays functional; the ONNX Runtime kernel writes the six cache parts in place (they are
    # in-place inputs of the program) and also returns the layer's staged rows ([T, H, D] each) that eviction reads.
    "layer_attention_onnx": (
        "layer_attention_onnx(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor state,"
        " Tensor sink_k, Tensor sink_v,"
        " Tensor win_k, Tensor win_v, Tensor evict_k, Tensor evict_v, Tensor[] pools, int layer, int group,"
        " float scale, bool features, int rotate) -> (Tensor out, Tensor recv, Tensor evict_k_rows,"
        " Tensor evict_v_rows)"
    ),
    "allocate": (
        "allocate(Tensor desired, Tensor valid, Tensor fill, Tensor caps) -> (Tensor cls, Tensor slot, Tensor fill_out)"
    ),
    "allocate.out": (
        "allocate.out(Tensor desired, Tensor valid, Tensor fill, Tensor caps, *, Tensor(a!) cls, Tensor(b!) slot,"
        " Tensor(c!) fill_out) -> (Tensor(a!), Tensor(b!), Tensor(c!))"
    ),
    "q8_linear": "q8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor",
    "q8_linear.out": "q8_linear.out(Tensor x, Tensor codes, Tensor scales, *, Tensor(a!) out) -> Tensor(a!)",
}

_lib: torch.library.Library | None = None


# ----------------------------------------------------------------------------- shape rules


def _check_layout(d: int, bits: int, group: int) -> None:
    quant.check_layout(d, bits, group)


def _quantize_pack_shapes(x: torch.Tensor, bits: int, group: int, clip: float):
    d = x.shape[-1]
    _check_layout(d, bits, group)
    quant.check_clip(clip)
    lead = tuple(x.shape[:-1])
    return lead + (d * bits // 8,), lead + (d // group,)


def _pool_attention_shapes(q: torch.Tensor, k_packed: torch.Tensor):
    hq, r, d = q.shape
    if hq % k_packed.shape[1]:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={k_packed.shape[1]}")
    return (hq, r, d), (hq, r)


# ----------------------------------------------------------------------------- eager (reference)


def _quantize_pack_impl(x, bits, group, clip=1.0):
    _quantize_pack_shapes(x, bits, group, clip)
    return tuple(t.contiguous() for t in quant.quantize_packed(x, bits, group, clip))


def _pool_attention_impl(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale):
    _pool_attention_shapes(q, k_packed)
    o, m, l = attention.pool_attention(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale
    )
    return o.contiguous(), m.contiguous(), l.contiguous()


def _layer_attention_shapes(q, win_k):
    _, t, _ = q.shape
    return tuple(q.shape), (win_k.shape[0] - 1 + t, layer_attention.N_RECV)


def _layer_attention_impl(q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, pools, layer,
                          group, scale, features, rotate):
    out, recv = layer_attention.layer_attention(q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k,
                                                evict_v, pools, layer, group, scale, features, rotate)
    return out.contiguous(), recv


def _staged_rows(evict: torch.Tensor, layer: int, t: int) -> torch.Tensor:
    return evict[:t, layer].clone()  # [T, H, D]


def _layer_attention_onnx_impl(q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, pools, layer,
                               *rest):
    out, recv = _layer_attention_impl(q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, pools,
                                      layer, *rest)
    t = q.shape[1]
    return out, recv, _staged_rows(evict_k, layer, t), _staged_rows(evict_v, layer, t)


def _allocate_impl(desired, valid, fill, caps):
    return tuple(t.contiguous() for t in allocate.allocate(desired, valid, fill, caps))


def _q8_linear_shape(x, codes, scales):
    if x.shape[-1] != codes.shape[1] or codes.shape[1] % tied.BLOCK or tuple(scales.shape) != (
            codes.shape[0], codes.shape[1] // tied.BLOCK):
        raise ValueError(f"q8_linear: x {tuple(x.shape)}, codes {tuple(codes.shape)}, scales {tuple(scales.shape)}")
    return (*x.shape[:-1], codes.shape[0])


def _q8_linear_impl(x, codes, scales):
    _q8_linear_shape(x, codes, scales)
    return tied.q8_0_linear(x, codes, scales).contiguous()


def _q8_linear_out_impl(x, codes, scales, *, out):
    return _copy_out((_q8_linear_impl(x, codes, scales),), (out,))[0]


def _q8_linear_fake(x, codes, scales):
    return x.new_empty(_q8_linear_shape(x, codes, scales), dtype=torch.float32)


def _q8_linear_out_meta(x, codes, scales, *, out):
    return out.resize_(_q8_linear_shape(x, codes, scales))


def _copy_out(results, outs):
    for res, out in zip(results, outs):
        out.resize_(res.shape)
        out.copy_(res)
    return outs


def _quantize_pack_out_impl(x, bits, group, clip=1.0, *, packed, scale, zero):
    return tuple(_copy_out(_quantize_pack_impl(x, bits, group, clip), (packed, scale, zero)))


def _pool_attention_out_impl(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale, *, o, m, l
):
    res = _pool_attention_impl(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale)
    return tuple(_copy_out(res, (o, m, l)))


def _layer_attention_out_impl(*args, out, recv):
    return tuple(_copy_out(_layer_attention_impl(*args), (out, recv)))


def _allocate_out_impl(desired, valid, fill, caps, *, cls, slot, fill_out):
    return tuple(_copy_out(_allocate_impl(desired, valid, fill, caps), (cls, slot, fill_out)))


# ----------------------------------------------------------------------------- fake / meta


def _quantize_pack_fake(x, bits, group, clip=1.0):
    packed_shape, sz_shape = _quantize_pack_shapes(x, bits, group, clip)
    return (
        x.new_empty(packed_shape, dtype=torch.uint8),
        x.new_empty(sz_shape, dtype=torch.float16),
        x.new_empty(sz_shape, dtype=torch.float16),
    )


def _pool_attention_fake(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale):
    o_shape, ml_shape = _pool_attention_shapes(q, k_packed)
    return (
        q.new_empty(o_shape, dtype=torch.float32),
        q.new_empty(ml_shape, dtype=torch.float32),
        q.new_empty(ml_shape, dtype=torch.float32),
    )


def _quantize_pack_out_meta(x, bits, group, clip=1.0, *, packed, scale, zero):
    packed_shape, sz_shape = _quantize_pack_shapes(x, bits, group, clip)
    return packed.resize_(packed_shape), scale.resize_(sz_shape), zero.resize_(sz_shape)


def _pool_attention_out_meta(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, n_valid, bits, group, scale, *, o, m, l
):
    o_shape, ml_shape = _pool_attention_shapes(q, k_packed)
    return o.resize_(o_shape), m.resize_(ml_shape), l.resize_(ml_shape)


def _layer_attention_fake(q, k, v, cos, sin, state, sink_k, sink_v, win_k, *rest):
    out_shape, recv_shape = _layer_attention_shapes(q, win_k)
    return q.new_empty(out_shape, dtype=torch.float32), q.new_empty(recv_shape, dtype=torch.float32)


def _layer_attention_onnx_fake(q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, *rest):
    rows = (q.shape[1], *evict_k.shape[2:])  # [T, H, D]
    return (*_layer_attention_fake(q, k, v, cos, sin, state, sink_k, sink_v, win_k), evict_k.new_empty(rows),
            evict_k.new_empty(rows))


def _layer_attention_out_meta(q, k, v, cos, sin, state, sink_k, sink_v, win_k, *rest, out, recv):
    out_shape, recv_shape = _layer_attention_shapes(q, win_k)
    return out.resize_(out_shape), recv.resize_(recv_shape)


def _allocate_fake(desired, valid, fill, caps):
    return torch.empty_like(desired), torch.empty_like(desired), torch.empty_like(fill)


def _allocate_out_meta(desired, valid, fill, caps, *, cls, slot, fill_out):
    return cls.resize_(desired.shape), slot.resize_(desired.shape), fill_out.resize_(fill.shape)


# ----------------------------------------------------------------------------- registration


def _already_defined() -> bool:
    try:
        torch.ops.kvexport.quantize_pack.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def register() -> None:
    """Define the ops and register eager + fake kernels. Idempotent within a process."""
    global _lib
    if _lib is not None:
        return
    if _already_defined():
        raise RuntimeError(
            "the 'kvexport' op namespace is already defined by another copy of kvexport.ops; "
            "import the ops from one installed location only"
        )
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    functional = {
        "quantize_pack": (_quantize_pack_impl, _quantize_pack_fake),
        "pool_attention": (_pool_attention_impl, _pool_attention_fake),
        "layer_attention": (_layer_attention_impl, _layer_attention_fake),
        "layer_attention_onnx": (_layer_attention_onnx_impl, _layer_attention_onnx_fake),
        "allocate": (_allocate_impl, _allocate_fake),
        "q8_linear": (_q8_linear_impl, _q8_linear_fake),
    }
    out = {
        "quantize_pack.out": (_quantize_pack_out_impl, _quantize_pack_out_meta),
        "pool_attention.out": (_pool_attention_out_impl, _pool_attention_out_meta),
        "layer_attention.out": (_layer_attention_out_impl, _layer_attention_out_meta),
        "allocate.out": (_allocate_out_impl, _allocate_out_meta),
        "q8_linear.out": (_q8_linear_out_impl, _q8_linear_out_meta),
    }
    for name, (impl, fake) in functional.items():
        lib.impl(name, impl, "CPU")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)
    for name, (impl, meta) in out.items():
        lib.impl(name, impl, "CPU")
        lib.impl(name, meta, "Meta")
    _lib = lib


def portable_decompositions() -> dict:
    """``{op: reference}`` table for ``ExportedProgram.run_decompositions``: inlines the core-ATen
    reference in place of each custom op (the "portable" build: no kernel library needed)."""
    ops = torch.ops.kvexport
    return {
        ops.quantize_pack.default: quant.quantize_packed,
        ops.pool_attention.default: attention.pool_attention,
        ops.allocate.default: allocate.allocate,
    }
