/*
 * The kvexport custom-op library for ONNX Runtime (libkvexport_ort.so): domain "kvexport", op
 * layer_attention (version 1), loaded with SessionOptions.register_custom_ops_library. A thin wrapper
 * around the core of layer_attention.h, the same source the ExecuTorch kernel runs.
 *
 * Inputs: q, k, v, state, the six cache parts the op writes (sink_k, sink_v, win_k, win_v, evict_k,
 * evict_v), the 20 pools (POOL_NAMES); attributes: layer, group, scale, features, rotate (ints 0/1 for the
 * flags). Outputs: out [1, Hq, T, D], recv [W + T, 3], and this layer's staged K and V rows
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

#include <cstring>
#include <string>

#include "layer_attention.h"

namespace {

using kvexport::core::DType;
using kvexport::core::View;

constexpr uint32_t kApiVersion = 18;  // == kvexport.ops.build.ORT_API_VERSION (KernelContext_ParallelFor: 17)
constexpr size_t kParts = 6;          // sink_k .. evict_v: inputs 4..9
constexpr size_t kInputs = 10 + kvexport::core::kPools;

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
  bool features, rotate;

  explicit LayerKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    layer = ki.GetAttribute<int64_t>("layer");
    group = ki.GetAttribute<int64_t>("group");
    scale = ki.GetAttribute<float>("scale");
    features = ki.GetAttribute<int64_t>("features") != 0;
    rotate = ki.GetAttribute<int64_t>("rotate") != 0;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    if (ctx.GetInputCount() != kInputs || ctx.GetOutputCount() != 4) {
      return Ort::Status("kvexport::layer_attention: expected 30 inputs and 4 outputs", ORT_INVALID_ARGUMENT).release();
    }
    kvexport::core::LayerCall c;
    View* parts[kParts] = {&c.sink_k, &c.sink_v, &c.win_k, &c.win_v, &c.evict_k, &c.evict_v};
    c.q = view(ctx.GetInput(0));
    c.k = view(ctx.GetInput(1));
    c.v = view(ctx.GetInput(2));
    c.state = view(ctx.GetInput(3));
    for (size_t i = 0; i < kParts; ++i) {
      *parts[i] = view(ctx.GetInput(4 + i));
    }
    for (int i = 0; i < kvexport::core::kPools; ++i) {
      c.pools[i] = view(ctx.GetInput(10 + i));
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
    int64_t os[4], rs[2];
    kvexport::core::out_sizes(c, os, rs);
    float* out = ctx.GetOutput(0, os, 4).GetTensorMutableData<float>();
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
    const int64_t t = c.q.size(2), hkv = c.k.size(1), d = c.k.size(3), n_layers = c.evict_k.size(1);
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
  // q, k, v float; state int32; the float parts and the 16-bit pool in the cache's float type; per class codes
  // uint8, scales and zero points fp16
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i < 3) {
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    if (i == 3) {
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
    if (i < 12) {
      return FP;
    }
    const size_t e = (i - 12) % 3;  // k, ks, kz, v, vs, vz
    return e == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  size_t GetOutputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i < 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : FP;
  }

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
  static Ort::CustomOpDomain domain{nullptr};
  try {
    if (!domain) {
      domain = Ort::CustomOpDomain("kvexport");
      domain.Add(&op_half);
      domain.Add(&op_float);
    }
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}
