/*
 * kvexport::q8_linear.out == kvexport.models.tied.q8_0_linear (activation codes bit-identical, output fp32
 * ~1e-6 rel)
 *
 * A linear over Q8_0 weights read in place: codes int8 [N, K], fp16 scales [N, K/32] (per block of
 * 32 inputs of one output row, w = d * q), x float32 [..., K] -> out float32 [..., N]. The lm_head
 * of `--weights q4-q8` reads the embedding lookup's own table through it, so a program stores the
 * tied table once, with the GGUF's codes (XNNPACK has no blockwise 8-bit GEMM).
 *
 * llama.cpp's arithmetic for Q8_0 weights: each input row is quantized per block of 32 to int8
 * (sx = amax/127, xq = round_half_even(x / sx), as q4.quantize_q8_0_rows), the block dot products
 * are exact integers (AVX2: maddubs + madd, 32 products per step), and each output takes
 * sum_b (d_b * sx_b) * isum_b in eight fp32 lanes reduced once per row. Rows are split over
 * ExecuTorch's thread pool (parallel_for, shared with XNNPACK).
 */

#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "kernel_common.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kvexport {
namespace native {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

using namespace common;  // NOLINT: the shared helpers of kernel_common.h

namespace {

constexpr int64_t kQ8Block = 32;       // tied.BLOCK
constexpr int64_t kRowsPerTask = 256;  // output rows per parallel_for grain

// One input row -> int8 codes and fp32 scales per block of 32 (q4.quantize_q8_0_rows, bit for bit:
// the same fp32 division and round-half-even).
void quantize_q8_0_row(const float* x, int64_t nb, int8_t* xq, float* sx) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQ8Block;
    float amax = 0.0f;
    for (int64_t i = 0; i < kQ8Block; ++i) {
      amax = std::max(amax, std::fabs(xb[i]));
    }
    const float s = amax / 127.0f;
    const float safe = s > 0.0f ? s : 1.0f;
    for (int64_t i = 0; i < kQ8Block; ++i) {
      const float r = std::nearbyint(xb[i] / safe);
      xq[b * kQ8Block + i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
    }
    sx[b] = s;
  }
}

// sum_b (d[b] * sx[b]) * (q_b . xq_b) in eight lanes: lane l holds the exact integer sum over elements
// 4l..4l+3 of a block, scaled (one fp32 multiply) and added to the lane's total; the lanes are
// reduced once per row. The AVX2 path and the scalar path round identically.
#if defined(__AVX2__)
inline float lane_sum(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

// The block step of one row: |xq| (unsigned) times q with xq's sign; pairs sum to at most 2 * 127 * 127,
// so maddubs does not saturate; lane l of the result holds elements 4l..4l+3.
inline __m256 block_step(__m256 tot, const int8_t* q, __m256i vx, __m256i ax, float scale) {
  const __m256i vq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(vq, vx)), _mm256_set1_epi16(1));
  return _mm256_add_ps(tot, _mm256_mul_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(scale)));
}

inline float q8_row_dot(const int8_t* q, const float* d, const int8_t* xq, const float* sx, int64_t nb) {
  __m256 tot = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i vx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kQ8Block));
    tot = block_step(tot, q + b * kQ8Block, vx, _mm256_sign_epi8(vx, vx), d[b] * sx[b]);
  }
  return lane_sum(tot);
}
#else
inline float q8_row_dot(const int8_t* q, const float* d, const int8_t* xq, const float* sx, int64_t nb) {
  float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < nb; ++b) {
    const float scale = d[b] * sx[b];
    for (int l = 0; l < 8; ++l) {
      int32_t isum = 0;
      for (int e = 4 * l; e < 4 * l + 4; ++e) {
        isum += static_cast<int32_t>(q[b * kQ8Block + e]) * xq[b * kQ8Block + e];
      }
      t[l] += static_cast<float>(isum) * scale;
    }
  }
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

#endif

}  // namespace

Tensor& q8_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scales,
                      Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float &&
                          codes.scalar_type() == ScalarType::Char && scales.scalar_type() == ScalarType::Half,
                      InvalidArgument, out,
                      "kvexport::q8_linear: x/out float32, codes int8, scales float16");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && codes.dim() == 2 && scales.dim() == 2, InvalidArgument, out,
                      "kvexport::q8_linear: x [..., K], codes [N, K], scales [N, K/32]");
  const int64_t n = codes.size(0), k = codes.size(1), nb = k / kQ8Block;
  ET_KERNEL_CHECK_MSG(ctx, k % kQ8Block == 0 && x.size(x.dim() - 1) == k && scales.size(0) == n &&
                          scales.size(1) == nb,
                      InvalidArgument, out, "kvexport::q8_linear: K must be a multiple of 32 and match codes");
  ET_KERNEL_CHECK(ctx, resize_last(out, x, n) == Error::Ok, InvalidArgument, out);
  ET_KERNEL_CHECK_MSG(ctx, dense(x) && dense(codes) && dense(scales) && dense(out), InvalidArgument, out,
                      "kvexport::q8_linear: tensors must be contiguous, default dim order");
  const int64_t m = x.numel() / k;
  const float* xp = x.const_data_ptr<float>();
  const int8_t* cp = codes.const_data_ptr<int8_t>();
  const auto* sp = static_cast<const uint16_t*>(scales.const_data_ptr());
  float* op = out.mutable_data_ptr<float>();
  std::vector<int8_t> xq(static_cast<size_t>(m * k));  // [M, K] activation codes
  std::vector<float> sx(static_cast<size_t>(m * nb));  // [M, K/32] their scales
  for (int64_t i = 0; i < m; ++i) {
    quantize_q8_0_row(xp + i * k, nb, xq.data() + i * k, sx.data() + i * nb);
  }
  bool ok = executorch::extension::parallel_for(0, n, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    std::vector<float> d(static_cast<size_t>(nb));
    for (int64_t r = r0; r < r1; ++r) {
      widen_half(sp + r * nb, d.data(), nb);
      for (int64_t i = 0; i < m; ++i) {
        op[i * n + r] = q8_row_dot(cp + r * k, d.data(), xq.data() + i * k, sx.data() + i * nb, nb);
      }
    }
  });
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "kvexport::q8_linear: parallel_for failed");
  return out;
}

}  // namespace native
}  // namespace kvexport

// ---------------------------------------------------------------- registration (boxed by hand,
// as in kvexport_ops.cpp)

namespace {

using executorch::runtime::EValue;
using executorch::runtime::Kernel;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

void q8_linear_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 4, InvalidProgram, ,
                      "kvexport::q8_linear.out: expected 4 arguments, got %zu", stack.size());
  kvexport::native::q8_linear_out(ctx, stack[0]->toTensor(), stack[1]->toTensor(), stack[2]->toTensor(),
                                  stack[3]->toTensor());
}

const Kernel kQ8Kernels[] = {Kernel("kvexport::q8_linear.out", q8_linear_boxed)};
const auto kQ8Registered = executorch::runtime::register_kernels({kQ8Kernels, 1});

}  // namespace
