/*
 * ExecuTorch out-variant kernels for the kvexport custom ops.
 *
 *   kvexport::quantize_pack.out      == kvexport.kv.quant.quantize_packed   (bit-identical)
 *   kvexport::pool_attention.out     == kvexport.kv.attention.pool_attention (fp32, ~1e-6 rel)
 *   kvexport::allocate.out           == kvexport.kv.allocate.allocate        (exact, integers)
 *
 * The Python functions in kvexport/kv are the spec. Build flags matter for bit-exactness:
 * compile with -ffp-contract=off (no fused multiply-add in the quantizer), never -ffast-math.
 *
 * This translation unit includes only ExecuTorch headers (never torch headers). For the wheel
 * build it is linked against executorch's _portable_lib; an app links it whole-archive into its
 * own ExecuTorch runtime so the static registrations at the bottom are kept.
 */

#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "allocate.h"
#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace kvexport {
namespace native {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::resize_tensor;

using Tensor3 = std::tuple<Tensor&, Tensor&, Tensor&>;

using namespace common;  // NOLINT: the shared helpers of kernel_common.h

namespace {

// ---------------------------------------------------------------- quantize one row

// One row of D floats -> packed bytes, fp16 scale/zero bits per group. Mirrors quant.quantize:
// every float op below is the same fp32 op, in the same order, as the torch reference (the build
// uses -ffp-contract=off, so `a * b + c` is a rounded multiply then a rounded add, as in torch).
// `shrink` is quant.clip_shrink(clip): 0 for no clipping.
void quantize_row(const float* x, int64_t d, int bits, int64_t group, float shrink, uint8_t* packed,
                  uint16_t* scale_out, uint16_t* zero_out, uint8_t* codes) {
  const int qmax = (1 << bits) - 1;
  const float fqmax = static_cast<float>(qmax);
  const int64_t ng = d / group;
  for (int64_t g = 0; g < ng; ++g) {
    const float* xs = x + g * group;
    float lo = xs[0], hi = xs[0];
    bool nan = false;
    for (int64_t i = 0; i < group; ++i) {
      const float v = xs[i];
      nan |= (v != v);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    if (nan) {  // amin/amax propagate NaN
      lo = hi = NAN;
    }
    if (shrink != 0.0f) {  // clipping: the grid spans the middle of [lo, hi]
      const float cut = (hi - lo) * shrink;
      lo = lo + cut;
      hi = hi - cut;
    }
    // zero = fp16(lo - (|lo| * 2**-10 + 2**-24)); scale = fp16(span + (span * 2**-10 + 2**-24))
    const float lo_nudge = std::fabs(lo) * kNudge + kTiny;
    const uint16_t zh = f32_to_f16(lo - lo_nudge);
    const float zf = f16_to_f32(zh);
    const float span = (hi - zf) / fqmax;
    const float span_nudge = span * kNudge + kTiny;
    const uint16_t sh = f32_to_f16(span + span_nudge);
    const float sf = f16_to_f32(sh);
    const float step = sf > 0.0f ? sf : 1.0f;
    uint8_t* c = codes + g * group;
    for (int64_t i = 0; i < group; ++i) {
      float r = std::nearbyint((xs[i] - zf) / step);
      r = r < 0.0f ? 0.0f : r;
      r = r > fqmax ? fqmax : r;
      c[i] = r == r ? static_cast<uint8_t>(r) : 0;
    }
    scale_out[g] = sh;
    zero_out[g] = zh;
  }
  if (bits == 8) {
    std::memcpy(packed, codes, d);
    return;
  }
  const int per = 8 / bits;
  const int64_t nbytes = d / per;
  for (int64_t b = 0; b < nbytes; ++b) {
    uint32_t v = 0;
    for (int i = 0; i < per; ++i) {
      v |= static_cast<uint32_t>(codes[b * per + i]) << (bits * i);
    }
    packed[b] = static_cast<uint8_t>(v);
  }
}

// Code values of every byte: kCodes<BITS>.v[byte][i] = float(code i of byte).
template <int BITS>
struct CodeTable {
  static constexpr int per = 8 / BITS;
  float v[256][per];
  CodeTable() {
    for (int b = 0; b < 256; ++b) {
      for (int i = 0; i < per; ++i) {
        v[b][i] = static_cast<float>((b >> (BITS * i)) & ((1 << BITS) - 1));
      }
    }
  }
};

template <int BITS>
const CodeTable<BITS>& code_table() {
  static const CodeTable<BITS> table;
  return table;
}

// One packed row -> D floats: code * scale + zero (fp32 mul then add, like quant.dequantize).
template <int BITS>
inline void dequant_row_t(const uint8_t* packed, const uint16_t* sc, const uint16_t* zp,
                          int64_t d, int64_t group, float* out) {
  constexpr int per = 8 / BITS;
  const int64_t ng = d / group;
  if (BITS == 8 || group % per != 0) {
    constexpr uint32_t mask = (1u << BITS) - 1u;
    for (int64_t g = 0; g < ng; ++g) {
      const float s = f16_to_f32(sc[g]);
      const float z = f16_to_f32(zp[g]);
      for (int64_t j = g * group; j < (g + 1) * group; ++j) {
        const uint32_t code = (static_cast<uint32_t>(packed[j / per]) >> (BITS * (j % per))) & mask;
        out[j] = static_cast<float>(code) * s + z;
      }
    }
    return;
  }
  const auto& table = code_table<BITS>();
  const int64_t bytes_per_group = group / per;
  for (int64_t g = 0; g < ng; ++g) {
    const float s = f16_to_f32(sc[g]);
    const float z = f16_to_f32(zp[g]);
    const uint8_t* pb = packed + g * bytes_per_group;
    float* o = out + g * group;
    for (int64_t b = 0; b < bytes_per_group; ++b) {
      const float* c = table.v[pb[b]];
      for (int i = 0; i < per; ++i) {
        o[b * per + i] = c[i] * s + z;
      }
    }
  }
}

inline void dequant_row(int bits, const uint8_t* packed, const uint16_t* sc, const uint16_t* zp,
                        int64_t d, int64_t group, float* out) {
  switch (bits) {
    case 2:
      dequant_row_t<2>(packed, sc, zp, d, group, out);
      break;
    case 4:
      dequant_row_t<4>(packed, sc, zp, d, group, out);
      break;
    default:
      dequant_row_t<8>(packed, sc, zp, d, group, out);
      break;
  }
}


}  // namespace

// ---------------------------------------------------------------- quantize_pack.out

Tensor3 quantize_pack_out(KernelRuntimeContext& ctx, const Tensor& x, int64_t bits, int64_t group,
                          double clip, Tensor& packed, Tensor& scale, Tensor& zero) {
  Tensor3 ret(packed, scale, zero);
  ET_KERNEL_CHECK_MSG(ctx, clip > 0.0 && clip <= 1.0, InvalidArgument, ret,
                      "kvexport::quantize_pack: clip must lie in (0, 1]");
  const float shrink = (1.0f - static_cast<float>(clip)) / 2.0f;  // quant.clip_shrink
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float, InvalidArgument, ret,
                      "kvexport::quantize_pack: x must be float32");
  ET_KERNEL_CHECK_MSG(ctx, packed.scalar_type() == ScalarType::Byte &&
                          scale.scalar_type() == ScalarType::Half &&
                          zero.scalar_type() == ScalarType::Half,
                      InvalidArgument, ret,
                      "kvexport::quantize_pack: outputs must be uint8, float16, float16");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.dim() <= kMaxDim, InvalidArgument, ret,
                      "kvexport::quantize_pack: bad rank");
  const int64_t d = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, layout_ok(d, bits, group), InvalidArgument, ret,
                      "kvexport::quantize_pack: bad layout D=%d bits=%d group=%d",
                      static_cast<int>(d), static_cast<int>(bits), static_cast<int>(group));
  ET_KERNEL_CHECK(ctx, resize_last(packed, x, d * bits / 8) == Error::Ok, InvalidArgument, ret);
  ET_KERNEL_CHECK(ctx, resize_last(scale, x, d / group) == Error::Ok, InvalidArgument, ret);
  ET_KERNEL_CHECK(ctx, resize_last(zero, x, d / group) == Error::Ok, InvalidArgument, ret);
  ET_KERNEL_CHECK_MSG(ctx, dense(x) && dense(packed) && dense(scale) && dense(zero),
                      InvalidArgument, ret,
                      "kvexport::quantize_pack: tensors must be contiguous, default dim order");
  const int64_t rows = d > 0 ? x.numel() / d : 0;
  const float* xp = x.const_data_ptr<float>();
  uint8_t* pp = packed.mutable_data_ptr<uint8_t>();
  uint16_t* sp = static_cast<uint16_t*>(scale.mutable_data_ptr());
  uint16_t* zp = static_cast<uint16_t*>(zero.mutable_data_ptr());
  std::vector<uint8_t> codes(static_cast<size_t>(d));
  const int64_t pb = d * bits / 8, ng = d / group;
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(xp + r * d, d, static_cast<int>(bits), group, shrink, pp + r * pb, sp + r * ng,
                 zp + r * ng, codes.data());
  }
  return ret;
}

// ---------------------------------------------------------------- pool_attention.out

namespace {

constexpr int64_t kBlock = 64;  // slots per softmax block

// Partial attention of the `nq` query vectors of one KV head over slots [n0, n1); keys packed at
// `bits` (rows of p bytes), values at `vbits` (rows of vpw bytes).
// o [nq, d], m [nq], l [nq] hold the running (flash-style) state.
void attend_head(const float* const* qv, int64_t nq, int64_t n0, int64_t n1, int64_t hkv,
                 int64_t h, int64_t d, int64_t p, int64_t vpw, int64_t ng, int bits, int vbits,
                 int64_t group, float sm,
                 const uint8_t* kp, const uint16_t* ks, const uint16_t* kz, const uint8_t* vp,
                 const uint16_t* vs, const uint16_t* vz, float* const* o, float* m, float* l,
                 float* scratch /* [kBlock * d + nq * kBlock] */) {
  float* rows = scratch;               // dequantised K (then V) rows of the block
  float* s = scratch + kBlock * d;     // scores / weights [nq, kBlock]
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, n1 - b0);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t slot = (b0 + j) * hkv + h;
      dequant_row(bits, kp + slot * p, ks + slot * ng, kz + slot * ng, d, group, rows + j * d);
    }
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s + i * kBlock;
      for (int64_t j = 0; j < nb; ++j) {
        si[j] = dot(qv[i], rows + j * d, d) * sm;
      }
      float bm = m[i];
      for (int64_t j = 0; j < nb; ++j) {
        bm = si[j] > bm ? si[j] : bm;
      }
      if (bm > m[i]) {
        const float corr = exp_neg(m[i] - bm);
        l[i] *= corr;
        float* oi = o[i];
        for (int64_t k = 0; k < d; ++k) {
          oi[k] *= corr;
        }
        m[i] = bm;
      }
      const float mi = m[i];
      exp_neg_shifted(si, nb, mi);
      float ls = 0.0f;
      for (int64_t j = 0; j < nb; ++j) {
        ls += si[j];
      }
      l[i] += ls;
    }
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t slot = (b0 + j) * hkv + h;
      dequant_row(vbits, vp + slot * vpw, vs + slot * ng, vz + slot * ng, d, group, rows + j * d);
    }
    for (int64_t i = 0; i < nq; ++i) {
      const float* si = s + i * kBlock;
      float* oi = o[i];
      for (int64_t j = 0; j < nb; ++j) {
        const float w = si[j];
        const float* vr = rows + j * d;
        for (int64_t k = 0; k < d; ++k) {
          oi[k] += w * vr[k];
        }
      }
    }
  }
}

}  // namespace

Tensor3 pool_attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_packed,
                           const Tensor& k_scale, const Tensor& k_zero, const Tensor& v_packed,
                           const Tensor& v_scale, const Tensor& v_zero, const Tensor& n_valid,
                           int64_t bits, int64_t group, double scale, Tensor& o, Tensor& m,
                           Tensor& l) {
  Tensor3 ret(o, m, l);
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && o.scalar_type() == ScalarType::Float &&
                          m.scalar_type() == ScalarType::Float && l.scalar_type() == ScalarType::Float,
                      InvalidArgument, ret, "kvexport::pool_attention: q/o/m/l must be float32");
  ET_KERNEL_CHECK_MSG(ctx, k_packed.scalar_type() == ScalarType::Byte &&
                          v_packed.scalar_type() == ScalarType::Byte &&
                          k_scale.scalar_type() == ScalarType::Half &&
                          k_zero.scalar_type() == ScalarType::Half &&
                          v_scale.scalar_type() == ScalarType::Half &&
                          v_zero.scalar_type() == ScalarType::Half,
                      InvalidArgument, ret,
                      "kvexport::pool_attention: pools must be uint8 codes with float16 scale/zero");
  ET_KERNEL_CHECK_MSG(ctx, n_valid.scalar_type() == ScalarType::Long && n_valid.numel() == 1,
                      InvalidArgument, ret, "kvexport::pool_attention: n_valid must be int64 [1]");
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 3 && k_packed.dim() == 3 && k_scale.dim() == 3 &&
                          k_zero.dim() == 3 && v_packed.dim() == 3 && v_scale.dim() == 3 &&
                          v_zero.dim() == 3,
                      InvalidArgument, ret, "kvexport::pool_attention: expected 3-d q and pools");
  ET_KERNEL_CHECK_MSG(ctx, bits == 2 || bits == 4 || bits == 8, InvalidArgument, ret,
                      "kvexport::pool_attention: bits must be 2, 4 or 8");
  const int64_t hq = q.size(0), r = q.size(1), d = q.size(2);
  const int64_t n = k_packed.size(0), hkv = k_packed.size(1), p = k_packed.size(2);
  ET_KERNEL_CHECK_MSG(ctx, layout_ok(d, bits, group) && p == d * bits / 8, InvalidArgument, ret,
                      "kvexport::pool_attention: packed width does not match head_dim");
  const int64_t ng = d / group;
  ET_KERNEL_CHECK_MSG(ctx, hkv > 0 && hq % hkv == 0, InvalidArgument, ret,
                      "kvexport::pool_attention: Hq must be a multiple of Hkv");
  const Tensor* pools[] = {&k_scale, &k_zero, &v_scale, &v_zero};
  for (const Tensor* t : pools) {
    ET_KERNEL_CHECK_MSG(ctx, t->size(0) == n && t->size(1) == hkv && t->size(2) == ng,
                        InvalidArgument, ret, "kvexport::pool_attention: scale/zero shape mismatch");
  }
  // values may be packed coarser than keys (K/V-split classes): their bits follow from the width
  const int64_t vpw = v_packed.size(2), vbits = d > 0 ? vpw * 8 / d : 0;
  ET_KERNEL_CHECK_MSG(ctx, v_packed.size(0) == n && v_packed.size(1) == hkv &&
                          (vbits == 2 || vbits == 4 || vbits == 8) && layout_ok(d, vbits, group) &&
                          vpw == d * vbits / 8,
                      InvalidArgument, ret, "kvexport::pool_attention: v_packed shape mismatch");
  {
    const SizesType os[3] = {static_cast<SizesType>(hq), static_cast<SizesType>(r),
                             static_cast<SizesType>(d)};
    ET_KERNEL_CHECK(ctx, resize_tensor(o, {os, 3}) == Error::Ok, InvalidArgument, ret);
    ET_KERNEL_CHECK(ctx, resize_tensor(m, {os, 2}) == Error::Ok, InvalidArgument, ret);
    ET_KERNEL_CHECK(ctx, resize_tensor(l, {os, 2}) == Error::Ok, InvalidArgument, ret);
  }
  ET_KERNEL_CHECK_MSG(ctx, dense(q) && dense(k_packed) && dense(k_scale) && dense(k_zero) &&
                          dense(v_packed) && dense(v_scale) && dense(v_zero) && dense(o) &&
                          dense(m) && dense(l),
                      InvalidArgument, ret,
                      "kvexport::pool_attention: tensors must be contiguous, default dim order");

  int64_t nv = n_valid.const_data_ptr<int64_t>()[0];
  nv = nv < 0 ? 0 : (nv > n ? n : nv);

  const float* qp = q.const_data_ptr<float>();
  float* op = o.mutable_data_ptr<float>();
  float* mp = m.mutable_data_ptr<float>();
  float* lp = l.mutable_data_ptr<float>();
  const int64_t total = hq * r;
  std::fill(op, op + total * d, 0.0f);
  std::fill(mp, mp + total, kNeg);
  std::fill(lp, lp + total, 0.0f);
  if (nv == 0 || total == 0) {
    return ret;
  }
  const int64_t grp = hq / hkv, nq = grp * r;
  const uint8_t* kp = k_packed.const_data_ptr<uint8_t>();
  const uint8_t* vp = v_packed.const_data_ptr<uint8_t>();
  const auto* ks = static_cast<const uint16_t*>(k_scale.const_data_ptr());
  const auto* kz = static_cast<const uint16_t*>(k_zero.const_data_ptr());
  const auto* vs = static_cast<const uint16_t*>(v_scale.const_data_ptr());
  const auto* vz = static_cast<const uint16_t*>(v_zero.const_data_ptr());
  const float sm = static_cast<float>(scale);

  // One task per KV head; the query vectors of its GQA group (grp heads x r rows) share each
  // dequantised K/V row.
  bool ok = executorch::extension::parallel_for(0, hkv, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> scratch(static_cast<size_t>(kBlock * d + nq * kBlock));
    std::vector<const float*> qv(static_cast<size_t>(nq));
    std::vector<float*> ov(static_cast<size_t>(nq));
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g = 0; g < grp; ++g) {
        for (int64_t i = 0; i < r; ++i) {
          const int64_t row = (h * grp + g) * r + i;
          qv[g * r + i] = qp + row * d;
          ov[g * r + i] = op + row * d;
        }
      }
      const int64_t row0 = h * grp * r;
      attend_head(qv.data(), nq, 0, nv, hkv, h, d, p, vpw, ng, static_cast<int>(bits), static_cast<int>(vbits),
                  group, sm, kp,
                  ks, kz, vp, vs, vz, ov.data(), mp + row0, lp + row0, scratch.data());
    }
  });
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, ret, "kvexport::pool_attention: parallel_for failed");
  return ret;
}

// ---------------------------------------------------------------- allocate.out

// The overflow rule: kvexport::core::allocate_rule (allocate.h).
Tensor3 allocate_out(KernelRuntimeContext& ctx, const Tensor& desired, const Tensor& valid, const Tensor& fill,
                     const Tensor& caps, Tensor& cls, Tensor& slot, Tensor& fill_out) {
  Tensor3 ret(cls, slot, fill_out);
  ET_KERNEL_CHECK_MSG(ctx, desired.scalar_type() == ScalarType::Long && valid.scalar_type() == ScalarType::Bool &&
                          fill.scalar_type() == ScalarType::Long && caps.scalar_type() == ScalarType::Long &&
                          cls.scalar_type() == ScalarType::Long && slot.scalar_type() == ScalarType::Long &&
                          fill_out.scalar_type() == ScalarType::Long,
                      InvalidArgument, ret, "kvexport::allocate: desired/fill/caps/outputs int64, valid bool");
  ET_KERNEL_CHECK_MSG(ctx, desired.dim() == 1 && valid.dim() == 1 && valid.size(0) == desired.size(0) &&
                          fill.dim() == 1 && caps.dim() == 1 && caps.size(0) == fill.size(0),
                      InvalidArgument, ret, "kvexport::allocate: desired/valid [N], fill/caps [K]");
  ET_KERNEL_CHECK(ctx, resize_tensor(cls, desired.sizes()) == Error::Ok, InvalidArgument, ret);
  ET_KERNEL_CHECK(ctx, resize_tensor(slot, desired.sizes()) == Error::Ok, InvalidArgument, ret);
  ET_KERNEL_CHECK(ctx, resize_tensor(fill_out, fill.sizes()) == Error::Ok, InvalidArgument, ret);
  kvexport::core::allocate_rule(desired.const_data_ptr<int64_t>(), valid.const_data_ptr<bool>(), desired.size(0),
                                fill.const_data_ptr<int64_t>(), caps.const_data_ptr<int64_t>(), fill.size(0),
                                cls.mutable_data_ptr<int64_t>(), slot.mutable_data_ptr<int64_t>(),
                                fill_out.mutable_data_ptr<int64_t>());
  return ret;
}

}  // namespace native
}  // namespace kvexport

// ---------------------------------------------------------------- registration
//
// The boxed stack holds the schema's arguments in order (inputs, then the kwarg-only out
// tensors), followed by the returned values. EXECUTORCH_LIBRARY's unboxing wrapper only handles a
// single out tensor in this executorch release, so the ops are unboxed by hand.

namespace {

using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Kernel;
using executorch::runtime::Span;

void quantize_pack_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 7, InvalidProgram, ,
                      "kvexport::quantize_pack.out: expected 7 arguments, got %zu", stack.size());
  kvexport::native::quantize_pack_out(ctx, stack[0]->toTensor(), stack[1]->toInt(),
                                      stack[2]->toInt(), stack[3]->toDouble(),
                                      stack[4]->toTensor(), stack[5]->toTensor(),
                                      stack[6]->toTensor());
}

void pool_attention_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 14, InvalidProgram, ,
                      "kvexport::pool_attention.out: expected 14 arguments, got %zu",
                      stack.size());
  kvexport::native::pool_attention_out(
      ctx, stack[0]->toTensor(), stack[1]->toTensor(), stack[2]->toTensor(),
      stack[3]->toTensor(), stack[4]->toTensor(), stack[5]->toTensor(), stack[6]->toTensor(),
      stack[7]->toTensor(), stack[8]->toInt(), stack[9]->toInt(), stack[10]->toDouble(),
      stack[11]->toTensor(), stack[12]->toTensor(), stack[13]->toTensor());
}

void allocate_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 7, InvalidProgram, ,
                      "kvexport::allocate.out: expected 7 arguments, got %zu", stack.size());
  kvexport::native::allocate_out(ctx, stack[0]->toTensor(), stack[1]->toTensor(), stack[2]->toTensor(),
                                 stack[3]->toTensor(), stack[4]->toTensor(), stack[5]->toTensor(),
                                 stack[6]->toTensor());
}

const Kernel kKernels[] = {
    Kernel("kvexport::quantize_pack.out", quantize_pack_boxed),
    Kernel("kvexport::pool_attention.out", pool_attention_boxed),
    Kernel("kvexport::allocate.out", allocate_boxed),
};

const auto kRegistered = executorch::runtime::register_kernels({kKernels, 3});

}  // namespace
