/*
 * The overflow rule of kvexport/kv/allocate.py (runtime-free: the ExecuTorch kernel kvexport::allocate.out and
 * the ONNX Runtime op kvexport::allocate both call it), sequentially: round r, class c, tokens in order. The
 * reference ranks a round's candidates for c with a cumulative sum and places those with
 * fill[c] + rank < caps[c]; once one fails every later one fails, so "place while there is room" is the same
 * rule. desired / valid [n], fill / caps [k] -> cls / slot [n] (-1 / 0 for tokens not placed), fill_out [k]
 * (fill_out may not alias fill).
 */
#pragma once

#include <cstdint>
#include <cstring>

namespace kvexport {
namespace core {

inline void allocate_rule(const int64_t* want, const bool* valid, int64_t n, const int64_t* fill,
                          const int64_t* cap, int64_t k, int64_t* cls, int64_t* slot, int64_t* fill_out) {
  std::memcpy(fill_out, fill, k * sizeof(int64_t));
  for (int64_t i = 0; i < n; ++i) {
    cls[i] = -1;
    slot[i] = 0;
  }
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t target = want[i] >= r ? want[i] - r : r;
        if (valid[i] && cls[i] < 0 && target == c && fill_out[c] < cap[c]) {
          cls[i] = c;
          slot[i] = fill_out[c]++;
        }
      }
    }
  }
}

}  // namespace core
}  // namespace kvexport
