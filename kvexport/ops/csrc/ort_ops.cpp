/*
 * The kvexport custom-op library for ONNX Runtime (libkvexport_ort.so): domain "kvexport", ops
 * layer_attention, allocate and block_offset (version 1), loaded with SessionOptions.register_custom_ops_library.
 * layer_attention and allocate are thin wrappers around the runtime-free cores of layer_attention.h and
 * allocate.h, the sources the ExecuTorch kernels run; block_offset is the second term of an exact Q4_1 linear
 * (kvexport.export.onnx_q4).
 *
 * Inputs: q [1, T, Hq*D], k, v [1, T, H*D] (the projection's rows, before RoPE), cos, sin [T, D], state, the six
 * cache parts the op writes (sink_k, sink_v, win_k, win_v, evict_k, evict_v), the 20 pools (POOL_NAMES);
 * attributes: layer, group, scale, features (0/1), rotate (mask: 1 keys, 2 values). Outputs: out [1, T, Hq*D], recv
 * [W + T, 3], and this layer's staged K and V rows
 * (evict_k[:T, layer], evict_v[:T, layer]: [T, H, D]). The six parts are written IN PLACE, in the input
 * buffers: they are graph inputs of the program that no other node reads (kvexport.export.onnx.in_place_state),
 * each layer's op touches only its own layer's rows, and eviction reads the staged rows this op returns, so
 * the program's result does not depend on the order ONNX Runtime runs the nodes in. (Returning the parts as
 * new values would copy all of them for every layer: the session planner does not reuse a custom op's input
 * buffer for its output, may-inplace declared or not; measured.)
 */

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstring>
#include <string>
#include <vector>

#include "allocate.h"
#include "kernel_math.h"
#include "layer_attention.h"

namespace {

using kvexport::core::DType;
using kvexport::core::View;

constexpr uint32_t kApiVersion = 18;  // == kvexport.native_build.ORT_API_VERSION (KernelContext_ParallelFor: 17)
constexpr size_t kParts = 6;          // sink_k .. evict_v: inputs 6..11
constexpr size_t kInputs = 12 + kvexport::core::kPools;

View view(const Ort::ConstValue& value) {
  View v;
  const auto info = value.GetTensorTypeAndShapeInfo();
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: v.dtype = DType::kFloat; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: v.dtype = DType::kHalf; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: v.dtype = DType::kByte; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: v.dtype = DType::kInt; break;
    default: v.dtype = DType::kOther;
  }
  const std::vector<int64_t> shape = info.GetShape();
  v.dim = shape.size() <= 4 ? static_cast<int>(shape.size()) : -1;
  for (int i = 0; i < v.dim; ++i) {
    v.sizes[i] = shape[i];
  }
  v.data = const_cast<void*>(value.GetTensorRawData());  // the six cache parts are written in place
  return v;
}

size_t element_bytes(DType t) { return t == DType::kFloat || t == DType::kInt ? 4 : t == DType::kHalf ? 2 : 1; }

struct LayerKernel {
  int64_t layer, group;
  float scale;
  bool features;
  int64_t rotate;  // mask: 1 keys, 2 values (programs from before value rotation: 0 / 1)

  explicit LayerKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    layer = ki.GetAttribute<int64_t>("layer");
    group = ki.GetAttribute<int64_t>("group");
    scale = ki.GetAttribute<float>("scale");
    features = ki.GetAttribute<int64_t>("features") != 0;
    rotate = ki.GetAttribute<int64_t>("rotate");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    if (ctx.GetInputCount() != kInputs || ctx.GetOutputCount() != 4) {
      return Ort::Status("kvexport::layer_attention: expected 32 inputs and 4 outputs", ORT_INVALID_ARGUMENT).release();
    }
    kvexport::core::LayerCall c;
    View* parts[kParts] = {&c.sink_k, &c.sink_v, &c.win_k, &c.win_v, &c.evict_k, &c.evict_v};
    c.q = view(ctx.GetInput(0));
    c.k = view(ctx.GetInput(1));
    c.v = view(ctx.GetInput(2));
    c.cos = view(ctx.GetInput(3));
    c.sin = view(ctx.GetInput(4));
    c.state = view(ctx.GetInput(5));
    for (size_t i = 0; i < kParts; ++i) {
      *parts[i] = view(ctx.GetInput(6 + i));
    }
    for (int i = 0; i < kvexport::core::kPools; ++i) {
      c.pools[i] = view(ctx.GetInput(6 + kParts + i));
    }
    c.layer = layer;
    c.group = group;
    c.scale = scale;
    c.features = features;
    c.rotate = rotate;
    const std::string problem = kvexport::core::check(c);
    if (!problem.empty()) {
      return Ort::Status(("kvexport::layer_attention: " + problem).c_str(), ORT_INVALID_ARGUMENT).release();
    }
    int64_t os[3], rs[2];
    kvexport::core::out_sizes(c, os, rs);
    float* out = ctx.GetOutput(0, os, 3).GetTensorMutableData<float>();
    float* recv = ctx.GetOutput(1, rs, 2).GetTensorMutableData<float>();
    const bool ok = kvexport::core::run(c, out, recv, [&](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
      ctx.ParallelFor([](void* f, size_t i) {
        (*static_cast<const std::function<void(int64_t, int64_t)>*>(f))(static_cast<int64_t>(i),
                                                                      static_cast<int64_t>(i) + 1);
      }, static_cast<size_t>(n), 0, const_cast<std::function<void(int64_t, int64_t)>*>(&fn));
      return true;
    });
    if (!ok) {
      return Ort::Status("kvexport::layer_attention: parallel_for failed", ORT_FAIL).release();
    }
    // the staged rows of this layer: evict[j, layer] for j < T
    const int64_t t = c.q.size(1), n_layers = c.evict_k.size(1), hkv = c.evict_k.size(2), d = c.evict_k.size(3);
    const size_t row = hkv * d * element_bytes(c.evict_k.dtype);
    const int64_t rows_shape[3] = {t, hkv, d};
    for (int side = 0; side < 2; ++side) {
      const View& evict = side == 0 ? c.evict_k : c.evict_v;
      char* dst = static_cast<char*>(ctx.GetOutput(2 + side, rows_shape, 3).GetTensorMutableRawData());
      for (int64_t j = 0; j < t; ++j) {
        std::memcpy(dst + j * row, static_cast<const char*>(evict.data) + (j * n_layers + c.layer) * row, row);
      }
    }
    return nullptr;
  }
};

// One op a float type of the cache (fp16, fp32): ONNX Runtime merges same-named ops into one schema.
template <ONNXTensorElementDataType FP>
struct LayerOp : Ort::CustomOpBase<LayerOp<FP>, LayerKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new LayerKernel(info);
    } catch (const Ort::Exception& e) {
      return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
    }
    return nullptr;
  }

  const char* GetName() const { return "layer_attention"; }
  size_t GetInputTypeCount() const { return kInputs; }
  // q, k, v, cos, sin float; state int32; the float parts and the 16-bit pool in the cache's float type; per class
  // codes uint8, scales and zero points fp16
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i < 5) {
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    if (i == 5) {
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
    if (i < 14) {
      return FP;
    }
    const size_t e = (i - 14) % 3;  // k, ks, kz, v, vs, vz
    return e == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  size_t GetOutputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i < 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : FP;
  }

};

// kvexport::block_offset(y [.., N], x [.., K], offsets [K/32, N]) -> y + blocksum(x) @ offsets, with
// blocksum(x)[.., b] = sum of x[.., 32b : 32b + 32] (kvexport.models.q4.Q4Int8Linear's offset term), in one
// node where MatMul(x, indicator), MatMul(., offsets) and Add took three. The offsets are fp32 or fp16 (the
// exporter stores fp16 where that is exact: every offset of the default model); they are a stream of 2-4 bytes
// x K/32 per output column, the op's whole cost. Prefill rows run as tasks of kColumns columns; a decode row
// runs on the caller (measured: handing its columns to the two-thread pool cost more than it saved).
constexpr int64_t kBlock32 = 32;
constexpr int64_t kColumns = 256;

template <typename T>
inline float offset_at(const T* off, int64_t i);
template <>
inline float offset_at<float>(const float* off, int64_t i) { return off[i]; }
template <>
inline float offset_at<uint16_t>(const uint16_t* off, int64_t i) {
  return kvexport::native::common::f16_to_f32(off[i]);
}

#if defined(__AVX2__)
inline __m256 offsets8(const float* off) { return _mm256_loadu_ps(off); }
inline __m256 offsets8(const uint16_t* off) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(off)));
}
#endif

// Columns [j0, j1) of row r.
template <typename T>
void block_offset_task(const float* y, const float* x, const T* off, int64_t k, int64_t n, int64_t r, int64_t j0,
                       int64_t j1, float* out) {
  const int64_t nb = k / kBlock32;
  float sums[64];  // nb <= 64 per pass: wider inputs take several passes over the columns
  const float* xr = x + r * k;
  const float* yr = y + r * n;
  float* o = out + r * n;
  for (int64_t b0 = 0; b0 < nb; b0 += 64) {
    const int64_t b1 = std::min(nb, b0 + 64);
    for (int64_t b = b0; b < b1; ++b) {
      float s = 0.0f;
      for (int64_t i = 0; i < kBlock32; ++i) {
        s += xr[b * kBlock32 + i];
      }
      sums[b - b0] = s;
    }
    const float* base = b0 == 0 ? yr : o;  // later passes add to what the first wrote
    int64_t j = j0;
#if defined(__AVX2__)
    // 32 columns a round, their sums in registers over the blocks (the scalar loop's order)
    for (; j + 32 <= j1; j += 32) {
      __m256 acc[4];
      for (int c = 0; c < 4; ++c) {
        acc[c] = _mm256_loadu_ps(base + j + 8 * c);
      }
      for (int64_t b = b0; b < b1; ++b) {
        const __m256 s = _mm256_set1_ps(sums[b - b0]);
        const T* ob = off + b * n + j;
        for (int c = 0; c < 4; ++c) {
          acc[c] = _mm256_add_ps(acc[c], _mm256_mul_ps(s, offsets8(ob + 8 * c)));
        }
      }
      for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(o + j + 8 * c, acc[c]);
      }
    }
#endif
    for (; j < j1; ++j) {
      float acc = base[j];
      for (int64_t b = b0; b < b1; ++b) {
        acc += sums[b - b0] * offset_at(off, b * n + j);
      }
      o[j] = acc;
    }
  }
}

// One block_offset call: its rows, columns and offsets' type.
struct BlockOffsetJob {
  const float *y, *x;
  const void* off;
  bool half;
  int64_t k, n, chunks;
  float* out;

  void run(int64_t r, int64_t j0, int64_t j1) const {
    if (half) {
      block_offset_task(y, x, static_cast<const uint16_t*>(off), k, n, r, j0, j1, out);
    } else {
      block_offset_task(y, x, static_cast<const float*>(off), k, n, r, j0, j1, out);
    }
  }
};

struct BlockOffsetKernel {
  explicit BlockOffsetKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue y = ctx.GetInput(0), x = ctx.GetInput(1), off = ctx.GetInput(2);
    const std::vector<int64_t> ys = y.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const auto off_info = off.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> os = off_info.GetShape();
    const auto off_type = off_info.GetElementType();
    const int64_t n = ys.empty() ? 0 : ys.back(), k = xs.empty() ? 0 : xs.back();
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < ys.size(); ++i) {
      rows *= ys[i];
    }
    if (ys.empty() || ys.size() != xs.size() || os.size() != 2 || k % kBlock32 || os[0] != k / kBlock32 ||
        os[1] != n || !std::equal(ys.begin(), ys.end() - 1, xs.begin()) ||
        (off_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && off_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)) {
      return Ort::Status("kvexport::block_offset: expected y [.., N], x [.., K] with the same leading dims and "
                         "offsets [K/32, N] fp32 or fp16, K a multiple of 32", ORT_INVALID_ARGUMENT).release();
    }
    const BlockOffsetJob job{y.GetTensorData<float>(), x.GetTensorData<float>(), off.GetTensorRawData(),
                             off_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, k, n, (n + kColumns - 1) / kColumns,
                             ctx.GetOutput(0, ys.data(), ys.size()).GetTensorMutableData<float>()};
    if (rows == 1) {  // a decode row: a few microseconds, less than handing tasks to the pool costs
      job.run(0, 0, n);
      return nullptr;
    }
    ctx.ParallelFor([](void* p, size_t i) {
      const BlockOffsetJob& jb = *static_cast<const BlockOffsetJob*>(p);
      const int64_t r = static_cast<int64_t>(i) / jb.chunks, j0 = static_cast<int64_t>(i) % jb.chunks * kColumns;
      jb.run(r, j0, std::min(jb.n, j0 + kColumns));
    }, static_cast<size_t>(rows * job.chunks), 0, const_cast<BlockOffsetJob*>(&job));
    return nullptr;
  }
};

// The kernel factory of the ops whose kernels read no attributes.
template <typename Op, typename Kernel>
struct PlainOp : Ort::CustomOpBase<Op, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    *kernel = new Kernel(info);
    return nullptr;
  }
};

struct BlockOffsetOp : PlainOp<BlockOffsetOp, BlockOffsetKernel> {
  const char* GetName() const { return "block_offset"; }
  size_t GetInputTypeCount() const { return 3; }
  // y, x fp32; offsets fp32 or fp16 (the one input of undefined type ONNX Runtime allows), checked by the kernel
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// kvexport::allocate(desired int64 [N], valid bool [N], fill int64 [K], caps int64 [K]) -> (cls [N], slot [N],
// fill_out [K]): the overflow rule (allocate.h), one node where the exported reference took ~14 a (round, class).
struct AllocateKernel {
  explicit AllocateKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue desired = ctx.GetInput(0), valid = ctx.GetInput(1), fill = ctx.GetInput(2),
                          caps = ctx.GetInput(3);
    const std::vector<int64_t> ds = desired.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> vs = valid.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> fs = fill.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> cs = caps.GetTensorTypeAndShapeInfo().GetShape();
    if (ds.size() != 1 || vs != ds || fs.size() != 1 || cs != fs) {
      return Ort::Status("kvexport::allocate: expected desired/valid [N], fill/caps [K]", ORT_INVALID_ARGUMENT)
          .release();
    }
    kvexport::core::allocate_rule(desired.GetTensorData<int64_t>(), valid.GetTensorData<bool>(), ds[0],
                                  fill.GetTensorData<int64_t>(), caps.GetTensorData<int64_t>(), fs[0],
                                  ctx.GetOutput(0, ds.data(), 1).GetTensorMutableData<int64_t>(),
                                  ctx.GetOutput(1, ds.data(), 1).GetTensorMutableData<int64_t>(),
                                  ctx.GetOutput(2, fs.data(), 1).GetTensorMutableData<int64_t>());
    return nullptr;
  }
};

struct AllocateOp : PlainOp<AllocateOp, AllocateKernel> {
  const char* GetName() const { return "allocate"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) {
    return nullptr;  // an ONNX Runtime older than 1.18: the session then fails on the unknown op, by name
  }
  Ort::InitApi(api);
  static LayerOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> op_half;
  static LayerOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> op_float;
  static BlockOffsetOp op_block_offset;
  static AllocateOp op_allocate;
  static Ort::CustomOpDomain domain{nullptr};
  try {
    if (!domain) {
      domain = Ort::CustomOpDomain("kvexport");
      domain.Add(&op_half);
      domain.Add(&op_float);
      domain.Add(&op_block_offset);
      domain.Add(&op_allocate);
    }
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}
