/*
 * ExecuTorch side of the kernel helpers: kernel_math.h (runtime-free) plus tensor layout checks and
 * resizing on ExecuTorch tensors.
 */
#pragma once

#include <executorch/runtime/kernel/kernel_includes.h>

#include "kernel_math.h"

namespace kvexport {
namespace native {
namespace common {

using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::resize_tensor;
using executorch::runtime::tensor_is_default_dim_order;

constexpr int kMaxDim = 16;

inline bool dense(const Tensor& t) {
  return tensor_is_default_dim_order(t) && executorch::runtime::tensor_is_contiguous(t);
}

// Resize `out` to t's sizes with the last dim replaced by `last`.
inline Error resize_last(Tensor& out, const Tensor& like, int64_t last) {
  SizesType sizes[kMaxDim];
  const int n = static_cast<int>(like.dim());
  for (int i = 0; i < n; ++i) {
    sizes[i] = like.size(i);
  }
  sizes[n - 1] = static_cast<SizesType>(last);
  return resize_tensor(out, {sizes, static_cast<size_t>(n)});
}

}  // namespace common
}  // namespace native
}  // namespace kvexport
