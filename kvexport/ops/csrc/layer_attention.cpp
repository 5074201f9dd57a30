/*
 * kvexport::layer_attention.out == kvexport.kv.layer_attention.layer_attention (its docstring is
 * the spec: inputs, state, staging of evicted tokens, outputs). fp32 math, ~1e-6 relative.
 *
 * Work split (flash-decoding): the cache is a list of parts (sinks, window, pool16, pool2, pool4,
 * pool8, the chunk); a task is (KV head h, block of <= kBlock filled slots of one part) and serves
 * every query vector of h (Hq/Hkv heads x T rows), so each K/V row is read once per step. A task
 * leaves a partial (o, m, l) per query vector; one log-sum-exp merge per query vector follows.
 * Tasks run on the runtime's thread pool (the wrapper's ParallelFor: ExecuTorch's, shared with XNNPACK,
 * or ONNX Runtime's intra-op pool).
 *
 * A task works on its block side by side: the block's K rows (then its V rows) become float rows in an
 * L1 scratch [block, D] (fp32 rows in place, fp16 rows widened, codes unpacked 16 at a time), then
 * every query vector takes its scores over the block, its softmax weights, and its weighted sum of V
 * rows with the sums held in registers across the block. Quantized parts are never dequantized: with
 * k = s*c + z per group, q.k = sum_g s_g*(q_g.c_g) + z_g*sum(q_g), and the V side sums (p*s_g)*c and
 * p*z_g separately; codes become small integers (as floats) only. A class's values may be packed
 * coarser than its keys (K/V-split classes, e.g. k4v2): each side's bits follow from its width.
 */

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_math.h"
#include "layer_attention.h"

namespace kvexport {
namespace core {

using namespace native::common;  // NOLINT: the shared helpers of kernel_math.h

namespace {

constexpr int64_t kBlock = 64;    // filled slots per task
constexpr int kStateSize = 5;     // p0, fill2, fill4, fill8, fill16
constexpr int kFloatRows = 16;    // Part::bits of float parts

// Codes of one packed row as floats (code i of a byte sits at bits [BITS*i, BITS*(i+1))).
template <int BITS>
inline void unpack_codes(const uint8_t* packed, int64_t d, float* codes) {
  constexpr int per = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  int64_t b = 0;
#if defined(__AVX2__)
  // 16 codes a round: split the bytes into per-code byte vectors, interleave them back into code order,
  // widen to int32 and convert
  constexpr int64_t bytes = 16 / per;  // input bytes a round
  const __m128i m = _mm_set1_epi8(static_cast<char>(mask));
  for (; (b + bytes) * per <= d; b += bytes) {
    __m128i x;
    if constexpr (BITS == 8) {
      x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + b));
    } else if constexpr (BITS == 4) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + b));
      x = _mm_unpacklo_epi8(_mm_and_si128(raw, m), _mm_and_si128(_mm_srli_epi16(raw, 4), m));
    } else {
      int32_t word;
      std::memcpy(&word, packed + b, 4);
      const __m128i raw = _mm_cvtsi32_si128(word);
      const __m128i c01 = _mm_unpacklo_epi8(_mm_and_si128(raw, m), _mm_and_si128(_mm_srli_epi16(raw, 2), m));
      const __m128i c23 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m),
                                            _mm_and_si128(_mm_srli_epi16(raw, 6), m));
      x = _mm_unpacklo_epi16(c01, c23);
    }
    float* dst = codes + b * per;
    _mm256_storeu_ps(dst, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x)));
    _mm256_storeu_ps(dst + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(x, 8))));
  }
#endif
  for (; b < d / per; ++b) {
    const uint32_t byte = packed[b];
    for (int i = 0; i < per; ++i) {
      codes[b * per + i] = static_cast<float>((byte >> (BITS * i)) & mask);
    }
  }
}

inline void unpack_row(int bits, const uint8_t* packed, int64_t d, float* codes) {
  if (bits == 2) {
    unpack_codes<2>(packed, d, codes);
  } else if (bits == 4) {
    unpack_codes<4>(packed, d, codes);
  } else {
    unpack_codes<8>(packed, d, codes);
  }
}

// One part of the cache, already offset to the layer: row (slot i, KV head h) of K starts at
// k + i * slot_stride + h * head_stride elements (codes: bytes); scale/zero rows likewise.
struct Part {
  int bits = kFloatRows;  // 16: float rows; 2/4/8: packed key codes
  int vbits = kFloatRows;  // the same for values (coarser than keys in K/V-split classes)
  bool half = false;      // float rows stored as fp16
  const void* k = nullptr;
  const void* v = nullptr;
  const uint16_t* ks = nullptr;
  const uint16_t* kz = nullptr;
  const uint16_t* vs = nullptr;
  const uint16_t* vz = nullptr;
  int64_t n = 0;
  int64_t slot_stride = 0, head_stride = 0;  // of K rows
  int64_t v_slot_stride = 0, v_head_stride = 0;  // of V rows
  int64_t sz_slot_stride = 0, sz_head_stride = 0;
  bool causal = false;  // the chunk: query row r sees slots <= r
};

struct Task {
  int64_t h, part, b0, b1;
};

// What every task reads.
struct Step {
  const float* q;     // [Hq, T, D]
  const float* qsum;  // [Hq * T, ng] sum of q over each group
  int64_t hq, hkv, grp, t, d, group, ng, nq;
  int64_t tb;         // rows of a task's scratch blocks: max(kBlock, T)
  float scale;
};

// Float row of a float part: in place (fp32) or widened into buf (fp16).
inline const float* float_row(const Part& p, const void* base, int64_t i, int64_t h, int64_t d,
                              float* buf) {
  const int64_t off = i * p.slot_stride + h * p.head_stride;  // float parts: V strides == K strides
  if (!p.half) {
    return static_cast<const float*>(base) + off;
  }
  widen_half(static_cast<const uint16_t*>(base) + off, buf, d);
  return buf;
}

// Rows of the slot-major parts (sinks, window: [slots, L, H, D]) are a whole layer-and-head stride apart, so
// every K/V row is a cache miss of its own that the hardware prefetcher does not see coming; the layer-major
// pools are contiguous per layer, yet their rows, scales and zero points are three streams. A task asks for
// its first kAhead K and V rows up front, then, while loading K row j, for K and V rows j + kAhead (the V
// pass finds its rows in cache). always_inline: GCC 12 at -O1 and up judges a function that only
// prefetches free of side effects and deletes its calls (it did, until then).
constexpr int64_t kAhead = 16;

__attribute__((always_inline)) inline void prefetch_row(const Part& p, bool value, int64_t i, int64_t h) {
  const void* data = value ? p.v : p.k;
  const uint16_t* scale = value ? p.vs : p.ks;
  const uint16_t* zero = value ? p.vz : p.kz;
  const int64_t bytes = p.bits == kFloatRows ? (p.half ? 2 : 4) : 1;  // per element / per code byte
  const int64_t off = value ? i * p.v_slot_stride + h * p.v_head_stride : i * p.slot_stride + h * p.head_stride;
  __builtin_prefetch(static_cast<const char*>(data) + off * bytes);
  if (scale != nullptr) {
    const int64_t zoff = i * p.sz_slot_stride + h * p.sz_head_stride;
    __builtin_prefetch(scale + zoff);
    __builtin_prefetch(zero + zoff);
  }
}

// K (value = false) or V rows of slots [b0, b0 + nb), KV head h, as float rows: rows[j] points into the
// part (fp32), or into buf [nb, d] (fp16 widened, codes unpacked); a quantized part's scales and zero
// points of row j go to sz[j * 2ng ...] (scales, then zero points).
void load_rows(const Part& p, bool value, int64_t h, int64_t b0, int64_t nb, int64_t d, int64_t ng, float* buf,
               float* sz, const float** rows) {
  const void* base = value ? p.v : p.k;
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t i = b0 + j;
    if (!value && j + kAhead < nb) {
      prefetch_row(p, false, i + kAhead, h);
      prefetch_row(p, true, i + kAhead, h);
    }
    float* dst = buf + j * d;
    rows[j] = dst;
    if (p.bits == kFloatRows) {
      rows[j] = float_row(p, base, i, h, d, dst);
      continue;
    }
    const int64_t off = value ? i * p.v_slot_stride + h * p.v_head_stride : i * p.slot_stride + h * p.head_stride;
    unpack_row(value ? p.vbits : p.bits, static_cast<const uint8_t*>(base) + off, d, dst);
    const int64_t zoff = i * p.sz_slot_stride + h * p.sz_head_stride;
    widen_half((value ? p.vs : p.ks) + zoff, sz + j * 2 * ng, ng);
    widen_half((value ? p.vz : p.kz) + zoff, sz + j * 2 * ng + ng, ng);
  }
}

#if defined(__AVX2__)
// a * b + c, fused where the CPU has FMA: the attention sums only (the quantizer and the exp stay
// unfused, and -ffp-contract=off keeps the compiler from fusing anything itself).
inline __m256 madd(__m256 a, __m256 b, __m256 c) {
#if defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return _mm256_add_ps(_mm256_mul_ps(a, b), c);
#endif
}
#endif

// o[e] = sum_j ws[j * ng + e / group] * rows[j][e] for e < d, W columns at a time (W divides group): the W
// sums stay in registers over all rows (a row-by-row update of o would load and store o for every row).
// Explicit vectors: GCC 12 keeps a float acc[W] on the stack and runs it scalar.
template <int W>
void weighted_rows(const float* const* rows, const float* ws, int64_t nb, int64_t d, int64_t group, int64_t ng,
                   float* o) {
  for (int64_t e0 = 0; e0 < d; e0 += W) {
    const int64_t g = e0 / group;
#if defined(__AVX2__)
    if constexpr (W % 8 == 0) {
      __m256 acc[W / 8];
      for (int k = 0; k < W / 8; ++k) {
        acc[k] = _mm256_setzero_ps();
      }
      for (int64_t j = 0; j < nb; ++j) {
        const __m256 w = _mm256_set1_ps(ws[j * ng + g]);
        const float* r = rows[j] + e0;
        for (int k = 0; k < W / 8; ++k) {
          acc[k] = madd(w, _mm256_loadu_ps(r + 8 * k), acc[k]);
        }
      }
      for (int k = 0; k < W / 8; ++k) {
        _mm256_storeu_ps(o + e0 + 8 * k, acc[k]);
      }
      continue;
    }
#endif
    float acc[W] = {};
    for (int64_t j = 0; j < nb; ++j) {
      const float w = ws[j * ng + g];
      const float* r = rows[j] + e0;
      for (int k = 0; k < W; ++k) {
        acc[k] += w * r[k];
      }
    }
    std::copy(acc, acc + W, o + e0);
  }
}

void weighted_rows_any(const float* const* rows, const float* ws, int64_t nb, int64_t d, int64_t group,
                       int64_t ng, float* o) {
  if (group % 32 == 0) {
    weighted_rows<32>(rows, ws, nb, d, group, ng, o);
  } else if (group % 8 == 0) {
    weighted_rows<8>(rows, ws, nb, d, group, ng, o);
  } else {
    weighted_rows<1>(rows, ws, nb, d, group, ng, o);
  }
}

#if defined(__AVX2__)
// The 8 dot products of q[e0:e1] with rows[r][e0:e1], r < 8 (e1 - e0 a multiple of 8): one accumulator a
// row, then a transposing reduction.
inline __m256 dot8(const float* q, const float* const* rows, int64_t e0, int64_t e1) {
  __m256 a[8];
  for (int r = 0; r < 8; ++r) {
    a[r] = _mm256_setzero_ps();
  }
  for (int64_t e = e0; e < e1; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    for (int r = 0; r < 8; ++r) {
      a[r] = madd(qv, _mm256_loadu_ps(rows[r] + e), a[r]);
    }
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// Scratch floats of one task (run_task's layout).
inline int64_t scratch_floats(const Step& s) {
  return s.nq * s.tb + s.tb * s.d + 2 * s.tb * s.ng + s.tb * s.ng + s.ng;
}

// Partial attention of the nq query vectors of KV head `task.h` over slots [b0, b1) of `part`.
// partial: [nq, d + 2] = (o, m, l); scratch: scratch_floats(s); rows: [tb] row pointers.
void run_task(const Step& s, const Part& part, const Task& task, float* partial, float* scratch,
              const float** rows) {
  const int64_t nb = task.b1 - task.b0, d = s.d, nq = s.nq, ng = s.ng, h = task.h;
  float* sc = scratch;              // [nq, tb] scores, then weights
  float* buf = sc + nq * s.tb;      // [tb, d] widened K/V rows or unpacked codes
  float* sz = buf + s.tb * d;       // [tb, 2, ng] scales and zero points of each row
  float* ws = sz + 2 * s.tb * ng;   // [tb, ng] weight x scale of each row and group
  float* za = ws + s.tb * ng;       // [ng] sum of weight x zero point per group
  const bool quant = part.bits != kFloatRows;
  auto query = [&](int64_t qi) { return (h * s.grp + qi / s.t) * s.t + qi % s.t; };
  for (int64_t j = 0; j < std::min(nb, kAhead); ++j) {
    prefetch_row(part, false, task.b0 + j, h);
    prefetch_row(part, true, task.b0 + j, h);
  }
  // scores: q.k = sum_g s_g * (q_g . c_g) + z_g * sum(q_g) on codes, q.k on float rows
  load_rows(part, false, h, task.b0, nb, d, ng, buf, sz, rows);
  for (int64_t qi = 0; qi < nq; ++qi) {
    const float* qv = s.q + query(qi) * d;
    const float* qs = s.qsum + query(qi) * ng;
    float* si = sc + qi * s.tb;
    int64_t j = 0;
#if defined(__AVX2__)
    if (s.group % 8 == 0) {
      for (; j + 8 <= nb; j += 8) {  // 8 rows at a time
        __m256 acc = quant ? _mm256_setzero_ps() : dot8(qv, rows + j, 0, d);
        for (int64_t g = 0; quant && g < ng; ++g) {
          const __m256 dots = dot8(qv, rows + j, g * s.group, (g + 1) * s.group);
          float sv[8], zv[8];
          for (int r = 0; r < 8; ++r) {
            sv[r] = sz[(j + r) * 2 * ng + g];
            zv[r] = sz[(j + r) * 2 * ng + ng + g];
          }
          acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(sv), dots),
                                                 _mm256_mul_ps(_mm256_loadu_ps(zv), _mm256_set1_ps(qs[g]))));
        }
        _mm256_storeu_ps(si + j, _mm256_mul_ps(acc, _mm256_set1_ps(s.scale)));
      }
    }
#endif
    for (; j < nb; ++j) {
      if (quant) {
        const float* szj = sz + j * 2 * ng;
        float acc = 0.0f;
        for (int64_t g = 0; g < ng; ++g) {
          acc += szj[g] * dot(qv + g * s.group, rows[j] + g * s.group, s.group) + szj[ng + g] * qs[g];
        }
        si[j] = acc * s.scale;
      } else {
        si[j] = dot(qv, rows[j], d) * s.scale;
      }
    }
  }
  // softmax weights of the block; masked (causal) slots get weight 0
  for (int64_t qi = 0; qi < nq; ++qi) {
    float* si = sc + qi * s.tb;
    const int64_t visible = part.causal ? std::min(nb, qi % s.t + 1 - task.b0) : nb;
    float m = kNeg, l = 0.0f;
    for (int64_t j = 0; j < visible; ++j) {
      m = si[j] > m ? si[j] : m;
    }
    exp_neg_shifted(si, visible, m);
    std::fill(si + std::max<int64_t>(visible, 0), si + nb, 0.0f);
    for (int64_t j = 0; j < nb; ++j) {
      l += si[j];
    }
    float* pi = partial + qi * (d + 2);
    pi[d] = m;
    pi[d + 1] = l;
  }
  // values: o = sum_j (p_j * s_jg) * c_j + sum_j p_j * z_jg on codes, sum_j p_j * v_j on float rows
  load_rows(part, true, h, task.b0, nb, d, ng, buf, sz, rows);
  for (int64_t qi = 0; qi < nq; ++qi) {
    const float* w = sc + qi * s.tb;
    float* o = partial + qi * (d + 2);
    if (!quant) {
      weighted_rows_any(rows, w, nb, d, d, 1, o);
      continue;
    }
    for (int64_t g = 0; g < ng; ++g) {
      float z = 0.0f;  // a local: za would alias ws, and a sum kept in memory waits on its own store
      for (int64_t j = 0; j < nb; ++j) {
        ws[j * ng + g] = w[j] * sz[j * 2 * ng + g];
        z += w[j] * sz[j * 2 * ng + ng + g];
      }
      za[g] = z;
    }
    weighted_rows_any(rows, ws, nb, d, s.group, ng, o);
    for (int64_t g = 0; g < ng; ++g) {
      for (int64_t e = g * s.group; e < (g + 1) * s.group; ++e) {
        o[e] += za[g];
      }
    }
  }
}

// Storage of the float parts: fp16 bits or fp32.
template <typename T>
inline void store_row(T* dst, const float* src, const uint16_t* src_half, int64_t d);

template <>
inline void store_row<float>(float* dst, const float* src, const uint16_t*, int64_t d) {
  std::copy(src, src + d, dst);
}

template <>
inline void store_row<uint16_t>(uint16_t* dst, const float*, const uint16_t* src_half, int64_t d) {
  std::copy(src_half, src_half + d, dst);
}

// Step 3 of the spec: stage the evicted rows, write the chunk into sinks / ring.
template <typename T>
void write_chunk(int64_t p0, int64_t t, int64_t sinks, int64_t window, int64_t hkv, int64_t d,
                 int64_t slot_stride, int64_t layer_off, const float* kr, const float* vr,
                 const uint16_t* kh, const uint16_t* vh, T* sink_k, T* sink_v, T* win_k, T* win_v,
                 T* ev_k, T* ev_v) {
  for (int64_t j = 0; j < t; ++j) {
    const int64_t pos = p0 + j;
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t src = (h * t + j) * d, row = layer_off + h * d;
      T* ek = ev_k + j * slot_stride + row;
      T* evv = ev_v + j * slot_stride + row;
      T* dk = nullptr;
      T* dv = nullptr;
      if (pos < sinks) {
        std::fill(ek, ek + d, T(0));
        std::fill(evv, evv + d, T(0));
        dk = sink_k + pos * slot_stride + row;
        dv = sink_v + pos * slot_stride + row;
      } else if (window > 0) {
        const int64_t slot = (pos - sinks) % window;
        dk = win_k + slot * slot_stride + row;
        dv = win_v + slot * slot_stride + row;
        std::copy(dk, dk + d, ek);
        std::copy(dv, dv + d, evv);
      } else {
        dk = ek;
        dv = evv;
      }
      store_row<T>(dk, kr + src, kh + src, d);
      store_row<T>(dv, vr + src, vh + src, d);
    }
  }
}

}  // namespace

namespace {

std::string format(const char* fmt, long long a, long long b = 0) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), fmt, a, b);
  return buf;
}

bool is(const View& x, DType t, int dim) { return x.dtype == t && x.dim == dim; }

// class c stores keys at kBitOf[c] bits and values at value_bits(c) <= kBitOf[c] bits (read from the width)
constexpr int kBitOf[3] = {2, 4, 8};

int value_bits(const LayerCall& c, int cls) {
  const View& vcodes = c.pools[5 + 6 * cls];
  return vcodes.dim == 3 ? static_cast<int>(vcodes.size(2) * 8 / c.sink_k.size(3)) : 0;  // sink_k: [.., D]
}

}  // namespace

std::string check(const LayerCall& c) {
  const View& sk = c.sink_k;  // [S+1, L, H, D]: the head count and size the chunk is split by
  if (sk.dim != 4 || sk.size(2) <= 0 || sk.size(3) <= 0) {
    return "float cache parts must be dense [N+1, L, H, D]";
  }
  const int64_t hkv = sk.size(2), d = sk.size(3);
  if (!(is(c.q, DType::kFloat, 3) && is(c.k, DType::kFloat, 3) && is(c.v, DType::kFloat, 3) && c.q.size(0) == 1 &&
        c.k.size(0) == 1 && c.v.size(0) == 1)) {
    return "q [1,T,Hq*D], k/v [1,T,H*D] must be float32";
  }
  const int64_t t = c.q.size(1), hq = c.q.size(2) / d;
  if (!(hq > 0 && hq % hkv == 0 && c.q.size(2) == hq * d && c.k.size(1) == t && c.k.size(2) == hkv * d &&
        c.v.size(1) == t && c.v.size(2) == hkv * d)) {
    return "q/k/v shapes do not match the cache's heads";
  }
  if (!(is(c.cos, DType::kFloat, 2) && is(c.sin, DType::kFloat, 2) && c.cos.size(0) == t && c.cos.size(1) == d &&
        c.sin.size(0) == t && c.sin.size(1) == d && d % 2 == 0)) {
    return "cos/sin must be float32 [T, D]";
  }
  if (!(c.state.dtype == DType::kInt && c.state.dim == 1 && c.state.size(0) == kStateSize)) {
    return "state must be int32 [5]";
  }
  const View* fp_bufs[] = {&c.sink_k, &c.sink_v, &c.win_k, &c.win_v, &c.evict_k, &c.evict_v};
  const DType fp = c.sink_k.dtype;
  if (fp != DType::kHalf && fp != DType::kFloat) {
    return "the float cache parts must be float16 or float32";
  }
  const int64_t n_layers = c.sink_k.dim == 4 ? c.sink_k.size(1) : 0;
  for (const View* b : fp_bufs) {
    if (!(is(*b, fp, 4) && b->size(1) == n_layers && b->size(2) == hkv && b->size(3) == d)) {
      return "float cache parts must be dense [N+1, L, H, D]";
    }
  }
  for (int e = 0; e < 2; ++e) {  // the 16-bit pool: layer-major [L * (C+1), H, D]
    const View& b = c.pools[e];
    if (!(is(b, fp, 3) && n_layers > 0 && b.size(0) % n_layers == 0 && b.size(0) == c.pools[0].size(0) &&
          b.size(1) == hkv && b.size(2) == d)) {
      return "the 16-bit pool must be dense [L*(C+1), H, D]";
    }
  }
  if (!(c.layer >= 0 && c.layer < n_layers && c.group > 0 && d % c.group == 0 && d % 4 == 0)) {
    return "bad layer or group";
  }
  if ((c.rotate & ~(kRotateKeys | kRotateValues)) != 0 || (c.rotate != 0 && (d & (d - 1)) != 0)) {
    return "rotate must be a mask of 1 (keys) and 2 (values), and needs a power-of-two head_dim";
  }
  if (!(c.evict_k.size(0) >= t && (c.win_k.size(0) == 1 || t <= c.win_k.size(0) - 1))) {
    return "chunk longer than the window or the eviction staging rows";
  }
  const int64_t ng = d / c.group;
  for (int cls = 0; cls < 3; ++cls) {
    const int vbits = value_bits(c, cls);
    if (vbits != 2 && vbits != 4 && vbits != 8) {
      return format("pool %lld-bit values must be packed at 2, 4 or 8 bits", kBitOf[cls]);
    }
    const View& codes = c.pools[2 + 6 * cls];
    for (int e = 0; e < 6; ++e) {
      const View& x = c.pools[2 + 6 * cls + e];
      const bool is_codes = e == 0 || e == 3;
      const int64_t width = d * (e == 0 ? kBitOf[cls] : vbits) / 8;
      if (!(is(x, is_codes ? DType::kByte : DType::kHalf, 3) && x.size(0) == codes.size(0) &&
            x.size(0) % n_layers == 0 && x.size(1) == hkv && x.size(2) == (is_codes ? width : ng))) {
        return format("pool %lld-bit tensor %lld has a bad shape or dtype", kBitOf[cls], e);
      }
    }
  }
  return "";
}

void out_sizes(const LayerCall& c, int64_t out[3], int64_t recv[2]) {
  out[0] = 1;
  out[1] = c.q.size(1);
  out[2] = c.q.size(2);
  recv[0] = c.win_k.size(0) - 1 + c.q.size(1);
  recv[1] = 3;
}

bool run(const LayerCall& c, float* op, float* rp, const ParallelFor& parallel_for) {
  const int64_t hkv = c.sink_k.size(2), d = c.sink_k.size(3), t = c.q.size(1), hq = c.q.size(2) / d;
  const int64_t n_layers = c.sink_k.size(1), layer = c.layer, group = c.group;
  const int64_t sinks = c.sink_k.size(0) - 1, window = c.win_k.size(0) - 1, ng = d / group;
  const View* pools = c.pools;
  int vbit_of[3];
  for (int cls = 0; cls < 3; ++cls) {
    vbit_of[cls] = value_bits(c, cls);
  }
  const int* bit_of = kBitOf;

  // ---- state: filled slots of every part
  const int32_t* st = static_cast<const int32_t*>(c.state.data);
  const int64_t p0 = st[0] < 0 ? 0 : st[0];
  const int64_t n_s = std::min(p0, sinks), n_w = std::min(std::max<int64_t>(p0 - sinks, 0), window);
  int64_t fills[4], rows_of[4];  // rows_of: slots per layer (capacity + the trash slot) of the layer-major pools
  for (int cls = 0; cls < 4; ++cls) {
    rows_of[cls] = (cls < 3 ? pools[2 + 6 * cls].size(0) : pools[0].size(0)) / n_layers;
    fills[cls] = std::min<int64_t>(std::max<int32_t>(st[1 + cls], 0), rows_of[cls] - 1);
  }

  // ---- the chunk: heads split from the token-major rows, RoPE on q and k (then the rotations rotate asks for),
  // k and v rounded to the storage dtype (what the cache will hold); qr [Hq, T, D], kr / vr [H, T, D]
  const bool half = c.sink_k.dtype == DType::kHalf;
  const int64_t nkv = hkv * t * d;
  const float* cos = static_cast<const float*>(c.cos.data);
  const float* sin = static_cast<const float*>(c.sin.data);
  std::vector<float> qr(hq * t * d), kr(nkv), vr(nkv);
  const bool rotate_k = (c.rotate & kRotateKeys) != 0, rotate_v = (c.rotate & kRotateValues) != 0;
  auto heads = [&](const float* src, int64_t n_heads, bool rope, bool rotate, float* dst) {
    for (int64_t hh = 0; hh < n_heads; ++hh) {
      for (int64_t r = 0; r < t; ++r) {
        const float* x = src + (r * n_heads + hh) * d;
        float* y = dst + (hh * t + r) * d;
        if (rope) {
          rope_row(x, cos + r * d, sin + r * d, d, y);
        } else {
          std::copy(x, x + d, y);
        }
        if (rotate) {
          rotate_row(y, d);
        }
      }
    }
  };
  heads(static_cast<const float*>(c.q.data), hq, true, rotate_k, qr.data());
  heads(static_cast<const float*>(c.k.data), hkv, true, rotate_k, kr.data());
  heads(static_cast<const float*>(c.v.data), hkv, false, rotate_v, vr.data());
  std::vector<uint16_t> kh(half ? nkv : 0), vh(half ? nkv : 0);
  if (half) {
    for (int64_t i = 0; i < nkv; ++i) {
      kh[i] = f32_to_f16(kr[i]);
      vh[i] = f32_to_f16(vr[i]);
      kr[i] = f16_to_f32(kh[i]);
      vr[i] = f16_to_f32(vh[i]);
    }
  }

  // ---- parts (offset to the layer)
  const int64_t esize = half ? 2 : 4;
  const int64_t slot_stride = n_layers * hkv * d, layer_off = layer * hkv * d;
  // slot-major parts (sinks, window): a slot's rows of all layers are adjacent; layer-major (pools): a layer's
  // slots are one contiguous run
  auto float_part = [&](const View& kt, const View& vt, int64_t n, int64_t offset, int64_t stride) {
    Part p;
    p.half = half;
    p.k = static_cast<const char*>(kt.data) + offset * esize;
    p.v = static_cast<const char*>(vt.data) + offset * esize;
    p.n = n;
    p.slot_stride = p.v_slot_stride = stride;
    p.head_stride = p.v_head_stride = d;
    return p;
  };
  std::vector<Part> parts;
  parts.push_back(float_part(c.sink_k, c.sink_v, n_s, layer_off, slot_stride));
  parts.push_back(float_part(c.win_k, c.win_v, n_w, layer_off, slot_stride));
  parts.push_back(float_part(pools[0], pools[1], fills[3], layer * rows_of[3] * hkv * d, hkv * d));
  for (int cls = 0; cls < 3; ++cls) {
    const View* x = &pools[2 + 6 * cls];
    const int64_t width = d * bit_of[cls] / 8, vwidth = d * vbit_of[cls] / 8;
    Part p;
    p.bits = bit_of[cls];
    p.vbits = vbit_of[cls];
    const int64_t first = layer * rows_of[cls];  // the layer's first row
    p.k = static_cast<const uint8_t*>(x[0].data) + first * hkv * width;
    p.v = static_cast<const uint8_t*>(x[3].data) + first * hkv * vwidth;
    const int64_t zo = first * hkv * ng;
    p.ks = static_cast<const uint16_t*>(x[1].data) + zo;
    p.kz = static_cast<const uint16_t*>(x[2].data) + zo;
    p.vs = static_cast<const uint16_t*>(x[4].data) + zo;
    p.vz = static_cast<const uint16_t*>(x[5].data) + zo;
    p.n = fills[cls];
    p.slot_stride = hkv * width;
    p.head_stride = width;
    p.v_slot_stride = hkv * vwidth;
    p.v_head_stride = vwidth;
    p.sz_slot_stride = hkv * ng;
    p.sz_head_stride = ng;
    parts.push_back(p);
  }
  {
    Part p;  // the chunk: fp32 rows [H, T, D], causal
    p.k = kr.data();
    p.v = vr.data();
    p.n = t;
    p.slot_stride = p.v_slot_stride = d;
    p.head_stride = p.v_head_stride = t * d;
    p.causal = true;
    parts.push_back(p);
  }

  // ---- tasks: (KV head, block of one part); the chunk is one block
  std::vector<Task> tasks;
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t pi = 0; pi < static_cast<int64_t>(parts.size()); ++pi) {
      const int64_t n = parts[pi].n, step = parts[pi].causal ? std::max<int64_t>(n, 1) : kBlock;
      for (int64_t b0 = 0; b0 < n; b0 += step) {
        tasks.push_back({h, pi, b0, std::min(n, b0 + step)});
      }
    }
  }
  const int64_t per_head = static_cast<int64_t>(tasks.size()) / hkv;
  const int64_t grp = hq / hkv, nq = grp * t;
  const float* qp = qr.data();
  std::vector<float> qsum(hq * t * ng);
  for (int64_t r = 0; r < hq * t; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      float acc = 0.0f;
      for (int64_t e = 0; e < group; ++e) {
        acc += qp[r * d + g * group + e];
      }
      qsum[r * ng + g] = acc;
    }
  }
  const Step s{qp, qsum.data(), hq, hkv, grp, t, d, group, ng, nq, std::max(kBlock, t), static_cast<float>(c.scale)};
  const int64_t stride = nq * (d + 2);
  std::vector<float> partial(tasks.size() * stride);
  // a task's scratch lives with its thread: ONNX Runtime calls the function once a task
  const bool ok = parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t a, int64_t b) {
    thread_local std::vector<float> scratch;
    thread_local std::vector<const float*> rows;
    scratch.resize(scratch_floats(s));
    rows.resize(s.tb);
    for (int64_t i = a; i < b; ++i) {
      run_task(s, parts[tasks[i].part], tasks[i], partial.data() + i * stride, scratch.data(), rows.data());
    }
  });
  if (!ok) {
    return false;
  }

  // ---- log-sum-exp merge per query vector
  std::vector<float> lse(hq * t);
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t qi = 0; qi < nq; ++qi) {
      const int64_t qrow = (h * grp + qi / t) * t + qi % t;
      float m = kNeg;
      for (int64_t i = 0; i < per_head; ++i) {
        m = std::max(m, partial[(h * per_head + i) * stride + qi * (d + 2) + d]);
      }
      float* o = op + ((qi % t) * hq + h * grp + qi / t) * d;  // out [T, Hq, D]: the output projection's rows
      std::fill(o, o + d, 0.0f);
      float l = 0.0f;
      for (int64_t i = 0; i < per_head; ++i) {
        const float* pi = partial.data() + (h * per_head + i) * stride + qi * (d + 2);
        const float w = exp_neg(pi[d] - m);
        l += pi[d + 1] * w;
        for (int64_t e = 0; e < d; ++e) {
          o[e] += pi[e] * w;
        }
      }
      for (int64_t e = 0; e < d; ++e) {
        o[e] /= l;
      }
      if (rotate_v) {
        rotate_row(o, d);  // back from the values' basis (H @ H = I)
      }
      lse[qrow] = m + std::log(l);
    }
  }

  // ---- features: attention received by window slots and chunk tokens (normalised weights)
  std::fill(rp, rp + (window + t) * 3, 0.0f);
  if (c.features) {
    const int64_t n_cache = n_s + n_w + fills[0] + fills[1] + fills[2] + fills[3];
    std::vector<float> w(hq), buf(d);
    auto received = [&](const Part& part, int64_t j, int64_t r0, float* dst) {
      for (int64_t r = r0; r < t; ++r) {
        float mean = 0.0f;
        for (int64_t hh = 0; hh < hq; ++hh) {
          const float* kr_j = float_row(part, part.k, j, hh / grp, d, buf.data());
          const float sc = dot(qp + (hh * t + r) * d, kr_j, d) * s.scale;
          w[hh] = std::exp(sc - lse[hh * t + r]) * static_cast<float>(n_cache + r + 1);
          mean += w[hh];
        }
        mean /= static_cast<float>(hq);
        float var = 0.0f;
        for (int64_t hh = 0; hh < hq; ++hh) {
          var += (w[hh] - mean) * (w[hh] - mean);
        }
        dst[0] += mean;
        dst[1] += var / static_cast<float>(hq);
      }
      dst[2] = static_cast<float>(t - r0);
    };
    for (int64_t j = 0; j < n_w; ++j) {
      received(parts[1], j, 0, rp + j * 3);
    }
    for (int64_t j = 0; j < t; ++j) {
      received(parts.back(), j, j + 1, rp + (window + j) * 3);
    }
  }

  // ---- write the chunk (after attention and features read the old ring)
  auto write = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    write_chunk<T>(p0, t, sinks, window, hkv, d, slot_stride, layer_off, kr.data(), vr.data(), kh.data(), vh.data(),
                   static_cast<T*>(c.sink_k.data), static_cast<T*>(c.sink_v.data), static_cast<T*>(c.win_k.data),
                   static_cast<T*>(c.win_v.data), static_cast<T*>(c.evict_k.data), static_cast<T*>(c.evict_v.data));
  };
  if (half) {
    write(static_cast<uint16_t*>(nullptr));
  } else {
    write(static_cast<float*>(nullptr));
  }
  return true;
}


}  // namespace core
}  // namespace kvexport
