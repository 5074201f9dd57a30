/*
 * The runtime-free core of kvexport::layer_attention (spec: kvexport.kv.layer_attention): one layer's
 * attention over every part of the cache plus the chunk's cache write. Both runtimes' kernels are thin
 * wrappers around it: layer_attention_executorch.cpp (ExecuTorch tensors, ExecuTorch's thread pool) and
 * ort_ops.cpp (ONNX Runtime tensors, ONNX Runtime's intra-op thread pool). A wrapper turns its tensors
 * into Views, asks check() for the rule every argument must follow, sizes `out` [1, T, Hq*D] and
 * `recv` [W + T, 3] (out_sizes) and calls run().
 */
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace kvexport {
namespace core {

enum class DType { kFloat, kHalf, kByte, kInt, kOther };

// A dense, row-major tensor as either runtime hands it to a kernel.
struct View {
  void* data = nullptr;
  DType dtype = DType::kOther;
  int dim = 0;
  int64_t sizes[4] = {0, 0, 0, 0};
  int64_t size(int i) const { return sizes[i]; }
};

constexpr int kPools = 20;  // POOL_NAMES: pool16 k/v, then k, ks, kz, v, vs, vz for 2, 4, 8
constexpr int64_t kRotateKeys = 1, kRotateValues = 2;  // LayerCall::rotate bits (CacheLayout.rotation)

// One call. sink_k ... evict_v are written in place (the chunk's rows, and the rows it evicts).
struct LayerCall {
  View q, k, v, cos, sin, state;  // q [1,T,Hq*D], k/v [1,T,H*D] fp32 before RoPE; cos/sin [T,D]; state int32 [5]
  View sink_k, sink_v, win_k, win_v, evict_k, evict_v;  // [N+1, L, H, D] fp16 or fp32
  View pools[kPools];                                   // layer-major [L*(C+1), H, ...]
  int64_t layer = 0, group = 0;
  double scale = 1.0;
  bool features = false;
  int64_t rotate = 0;  // mask: kRotateKeys (queries and keys), kRotateValues (values, and the output back)
};

// fn(begin, end) over [0, n), split over the runtime's threads; false when the runtime failed.
using ParallelFor = std::function<bool(int64_t n, const std::function<void(int64_t, int64_t)>& fn)>;

// "" when the call follows the rules, else what is wrong (one line, without the op's name).
std::string check(const LayerCall& c);

// out [1, T, Hq*D]; recv [W + T, 3].
void out_sizes(const LayerCall& c, int64_t out[3], int64_t recv[2]);

// Attend and write the chunk; out / recv: dense fp32 of out_sizes. false when parallel_for failed.
bool run(const LayerCall& c, float* out, float* recv, const ParallelFor& parallel_for);

}  // namespace core
}  // namespace kvexport
