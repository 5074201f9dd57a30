/*
 * Helpers shared by the kvexport kernels of both runtimes (ExecuTorch and ONNX Runtime): bit-exact
 * fp16 conversion, the exp used for softmax weights, the key rotation, a dot product and the layout rule.
 * No runtime headers: kernel_common.h adds ExecuTorch's tensor helpers on top.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace kvexport {
namespace native {
namespace common {

constexpr float kNeg = -1.0e30f;  // attention.NEG

// ---------------------------------------------------------------- fp16 helpers (bit exact)

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 -> float16 bits, round to nearest even (what torch's .to(torch.float16) does).
inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf / nan
    return sign | 0x7c00u | (ax > 0x7f800000u ? (0x200u | ((ax >> 13) & 0x3ffu)) : 0u);
  }
  if (ax >= 0x477ff000u) {  // >= 65520 rounds to inf
    return sign | 0x7c00u;
  }
  if (ax >= 0x38800000u) {  // result is a normal half
    const uint32_t odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + odd;  // re-bias exponent by -112 and round half to even
    return sign | static_cast<uint16_t>(ax >> 13);
  }
  if (ax <= 0x33000000u) {  // <= 2^-25 (a tie at 2^-25 goes to even, i.e. 0)
    return sign;
  }
  // subnormal half: mantissa = round(|f| / 2^-24)
  const uint32_t e = ax >> 23;
  const uint32_t mm = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24
  uint32_t q = mm >> shift;
  const uint32_t rem = mm & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) {
    ++q;
  }
  return sign | static_cast<uint16_t>(q);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {
    // zero or subnormal: m * 2^-24 is exact in fp32
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (e == 31) {
    return bits_f32(sign | 0x7f800000u | (m << 13));
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// fp16 bits -> fp32, n of them (exact; F16C eight at a time where built with it).
inline void widen_half(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) {
#if defined(__F16C__)
    dst[i] = _cvtsh_ss(src[i]);
#else
    dst[i] = f16_to_f32(src[i]);
#endif
  }
}

// quant.FP16_NUDGE / quant.FP16_TINY
constexpr float kNudge = 0.0009765625f;          // 2**-10
constexpr float kTiny = 5.9604644775390625e-08f;  // 2**-24

// ---------------------------------------------------------------- shape helpers

inline bool layout_ok(int64_t d, int64_t bits, int64_t group) {
  return (bits == 2 || bits == 4 || bits == 8) && group > 0 && d > 0 && d % group == 0 &&
      (d * bits) % 8 == 0;
}

// ---------------------------------------------------------------- math

// exp for x <= 0 (softmax weights), ~2 ulp; branch-free so loops over it vectorise.
inline float exp_neg(float x_in) {
  const float x = x_in < -87.0f ? -87.0f : x_in;
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (|v| < 2^22)
  const float n = (x * log2e + magic) - magic;
  float r = x - n * ln2_hi;
  r = r - n * ln2_lo;
  // Cephes expf polynomial
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;  // >= 1 since n >= -126
  const float y = p * bits_f32(static_cast<uint32_t>(e) << 23);
  return x_in < -87.0f ? 0.0f : y;  // exp(NEG - m) == 0 exactly, as in the reference
}

// x[j] <- exp_neg(x[j] - m) for j < n; with AVX2 eight at a time, the same operations in the same order
// (no FMA), so bit-identical to the scalar form.
inline void exp_neg_shifted(float* x, int64_t n, float m) {
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256 mv = _mm256_set1_ps(m), lo = _mm256_set1_ps(-87.0f), magic = _mm256_set1_ps(12582912.0f);
  const float poly[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                         4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
  for (; j + 8 <= n; j += 8) {
    const __m256 xin = _mm256_sub_ps(_mm256_loadu_ps(x + j), mv);
    const __m256 under = _mm256_cmp_ps(xin, lo, _CMP_LT_OQ);
    const __m256 xv = _mm256_blendv_ps(xin, lo, under);
    const __m256 nv = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xv, _mm256_set1_ps(1.44269504088896341f)), magic),
                                    magic);
    __m256 r = _mm256_sub_ps(xv, _mm256_mul_ps(nv, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(nv, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(poly[0]);
    for (int k = 1; k < 6; ++k) {
      p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(poly[k]));
    }
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(nv), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    _mm256_storeu_ps(x + j, _mm256_blendv_ps(y, _mm256_setzero_ps(), under));
  }
#endif
  for (; j < n; ++j) {
    x[j] = exp_neg(x[j] - m);
  }
}

// y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[h:], x[:h]) with h = d / 2 (Hugging Face's layout;
// kvexport.models.llama.apply_rope): each product and the sum rounded once, as torch computes it, so the
// result is bit-identical to the reference (-ffp-contract=off keeps the compiler from fusing them).
inline void rope_row(const float* x, const float* cos, const float* sin, int64_t d, float* y) {
  const int64_t h = d / 2;
  for (int64_t j = 0; j < d; ++j) {
    const float turned = j < h ? -x[j + h] : x[j - h];
    y[j] = x[j] * cos[j] + turned * sin[j];
  }
}

// x <- x @ H (orthonormal Sylvester-Hadamard, d a power of two): the fast Walsh-Hadamard transform in
// kvexport.kv.quant.rotate's order (pairs (j, j + h) for h = 1, 2, 4, ...), then one multiply by
// fp32(1 / sqrt(d)). Additions only, so the result is bit-identical to the reference.
inline void rotate_row(float* x, int64_t d) {
  for (int64_t h = 1; h < d; h *= 2) {
    for (int64_t i = 0; i < d; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  for (int64_t j = 0; j < d; ++j) {
    x[j] *= s;
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int k = 0; k < 8; ++k) {
      acc[k] += a[i + k] * b[i + k];
    }
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < d; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

}  // namespace common
}  // namespace native
}  // namespace kvexport
