// GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, pushing each
// column's rounding error onto the columns not yet quantized, weighted by the inverse
// Hessian of the layer's squared output error, H = 2/n * sum_x x x^T.
//
// Integer grid (the format table's conventions, any bit width 2..8):
//   symmetric:  qmin = -2^(b-1), qmax = 2^(b-1) - 1, scale = max(-lo, hi) / qmax, zp = 0
//   asymmetric: qmin = 0, qmax = 2^b - 1, scale = (hi - lo) / qmax, zp = clamp(rne(-lo/scale))
//   with lo = min(min w, 0), hi = max(max w, 0) over the group; scale is stored as fp32
//   (1 if it would be 0) and the codes are clamp(rne(w / scale) + zp, qmin, qmax).
// Group parameters come from the partly updated weights when a group starts ("dynamic");
// with act_order, or one group per row, they come from the original weights up front
// ("static"), so groups stay contiguous in the original column order.
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

struct GptqOptions {
  int bits = 4;
  bool symmetric = true;
  int64_t group_size = 128;  // >= cols: one group per row; else ceil(cols / group_size), last short
  int64_t block_size = 128;  // lazy-update block, rounded up to a multiple of group_size
  bool act_order = false;    // visit columns by decreasing H diagonal
  double damp = 0.01;        // added to H's diagonal, as a fraction of its mean
};

struct GptqResult {
  double damp_used;    // fraction actually used (raised x10 until Cholesky succeeds)
  double loss;         // sum over rows and columns of err^2 / Hinv_jj^2 / 2 (the paper's)
};

// w: [rows, cols] f32.  h: [cols, cols] f32, symmetric.  codes: [rows, cols] int32 (in the
// original column order).  scales: [rows, ceil(cols / group_size)] f32.  zero_points: same shape,
// uint8 (zeros for symmetric).  Caller allocates everything.
GptqResult gptq_quantize(const TensorView& w, const TensorView& h, const GptqOptions& opt,
                         const TensorView& codes, const TensorView& scales,
                         const TensorView& zero_points);

// Integer grid of a bit width: (qmin, qmax, scale divisor).
struct IntGrid {
  int32_t qmin, qmax, divisor;
};
IntGrid int_grid(int bits, bool symmetric);

}  // namespace tensorslim
