/*
 * kvexport::layer_attention.out for ExecuTorch: ExecuTorch tensors to the runtime-free core of
 * layer_attention.h (which checks them, attends and writes the chunk), tasks on ExecuTorch's thread pool
 * (shared with XNNPACK).
 */

#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <tuple>

#include "kernel_common.h"
#include "layer_attention.h"

namespace kvexport {
namespace native {

using namespace common;  // NOLINT: the shared helpers of kernel_common.h
using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::runtime::KernelRuntimeContext;

namespace {

core::View view(const Tensor& t) {
  core::View v;
  v.data = const_cast<void*>(t.const_data_ptr());  // the core writes only the cache parts it is given to write
  switch (t.scalar_type()) {
    case ScalarType::Float: v.dtype = core::DType::kFloat; break;
    case ScalarType::Half: v.dtype = core::DType::kHalf; break;
    case ScalarType::Byte: v.dtype = core::DType::kByte; break;
    case ScalarType::Int: v.dtype = core::DType::kInt; break;
    default: v.dtype = core::DType::kOther;
  }
  v.dim = t.dim() <= 4 ? static_cast<int>(t.dim()) : -1;
  for (int i = 0; i < v.dim; ++i) {
    v.sizes[i] = t.size(i);
  }
  return v;
}

}  // namespace

std::tuple<Tensor&, Tensor&> layer_attention_out(
    KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos,
    const Tensor& sin, const Tensor& state, Tensor& sink_k, Tensor& sink_v, Tensor& win_k, Tensor& win_v,
    Tensor& evict_k, Tensor& evict_v, ArrayRef<Tensor> pools, int64_t layer, int64_t group,
    double scale, bool features, int64_t rotate, Tensor& out, Tensor& recv) {
  std::tuple<Tensor&, Tensor&> ret(out, recv);
  const char* name = "kvexport::layer_attention";
  ET_KERNEL_CHECK_MSG(ctx, pools.size() == core::kPools, InvalidArgument, ret, "%s: expected 20 pool tensors",
                      name);
  core::LayerCall c;
  c.q = view(q);
  c.k = view(k);
  c.v = view(v);
  c.cos = view(cos);
  c.sin = view(sin);
  c.state = view(state);
  c.sink_k = view(sink_k);
  c.sink_v = view(sink_v);
  c.win_k = view(win_k);
  c.win_v = view(win_v);
  c.evict_k = view(evict_k);
  c.evict_v = view(evict_v);
  bool all_dense = dense(q) && dense(k) && dense(v) && dense(cos) && dense(sin) && dense(out) && dense(recv);
  for (const Tensor* t : {&sink_k, &sink_v, &win_k, &win_v, &evict_k, &evict_v}) {
    all_dense = all_dense && dense(*t);
  }
  for (int i = 0; i < core::kPools; ++i) {
    c.pools[i] = view(pools[i]);
    all_dense = all_dense && dense(pools[i]);
  }
  c.layer = layer;
  c.group = group;
  c.scale = scale;
  c.features = features;
  c.rotate = rotate;
  ET_KERNEL_CHECK_MSG(ctx, all_dense && out.scalar_type() == ScalarType::Float &&
                          recv.scalar_type() == ScalarType::Float,
                      InvalidArgument, ret, "%s: tensors must be contiguous, default dim order; out, recv float32",
                      name);
  const std::string problem = core::check(c);
  ET_KERNEL_CHECK_MSG(ctx, problem.empty(), InvalidArgument, ret, "%s: %s", name, problem.c_str());
  {
    int64_t os[3], rs[2];
    core::out_sizes(c, os, rs);
    const SizesType o3[3] = {static_cast<SizesType>(os[0]), static_cast<SizesType>(os[1]),
                             static_cast<SizesType>(os[2])};
    const SizesType r2[2] = {static_cast<SizesType>(rs[0]), static_cast<SizesType>(rs[1])};
    ET_KERNEL_CHECK(ctx, resize_tensor(out, {o3, 3}) == Error::Ok, InvalidArgument, ret);
    ET_KERNEL_CHECK(ctx, resize_tensor(recv, {r2, 2}) == Error::Ok, InvalidArgument, ret);
  }
  const bool ok = core::run(c, out.mutable_data_ptr<float>(), recv.mutable_data_ptr<float>(),
                            [](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
                              return executorch::extension::parallel_for(0, n, 1, fn);
                            });
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, ret, "%s: parallel_for failed", name);
  return ret;
}

}  // namespace native
}  // namespace kvexport

namespace {

using executorch::runtime::EValue;
using executorch::runtime::Kernel;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// Stack: q, k, v, cos, sin, state, sink_k, sink_v, win_k, win_v, evict_k, evict_v, pools, layer, group,
// scale, features, rotate, out, recv (then the returned values). rotate is an int mask; programs from before
// value rotation hold a bool there (keys only), read as 0 / 1. A program of an older kvexport still (q/k/v
// after RoPE, no cos/sin) has a tensor where rotate is: it is refused.
void layer_attention_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 20 && (stack[17]->isBool() || stack[17]->isInt()), InvalidProgram, ,
                      "kvexport::layer_attention.out: expected 20 arguments (q, k, v, cos, sin, ...): a program "
                      "of an older kvexport; rebuild it");
  kvexport::native::layer_attention_out(
      ctx, stack[0]->toTensor(), stack[1]->toTensor(), stack[2]->toTensor(), stack[3]->toTensor(),
      stack[4]->toTensor(), stack[5]->toTensor(), stack[6]->toTensor(), stack[7]->toTensor(),
      stack[8]->toTensor(), stack[9]->toTensor(), stack[10]->toTensor(), stack[11]->toTensor(),
      stack[12]->toTensorList(), stack[13]->toInt(), stack[14]->toInt(), stack[15]->toDouble(),
      stack[16]->toBool(), stack[17]->isBool() ? int64_t{stack[17]->toBool()} : stack[17]->toInt(),
      stack[18]->toTensor(), stack[19]->toTensor());
}

const Kernel kLayerKernels[] = {Kernel("kvexport::layer_attention.out", layer_attention_boxed)};
const auto kLayerRegistered = executorch::runtime::register_kernels({kLayerKernels, 1});

}  // namespace
