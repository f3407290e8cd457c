// SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix column by column with the
// optimal-brain-surgeon update, so each pruned weight's error is pushed onto the columns not
// yet visited, weighted by the inverse Hessian of the layer's squared output error
// H = 2/n * sum_x x x^T. Optionally the kept weights are quantized in the same sweep
// (joint sparse + quantized), so the compensation covers the rounding error too.
//
// With U the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (as GPTQ), columns are
// visited in lazy blocks of block_size (rounded up to a multiple of m):
//   mask choice, score s_rc = w_rc^2 / U_cc^2 on the current (already updated) weights:
//     unstructured: at each block start, the round(sparsity * rows * block width) smallest
//       scores of the whole block (all rows together: the paper's adaptive mask) are pruned;
//       ties go to the lower flat index (row-major within the block).
//     n:m: at each group start (columns c0 .. c0+m-1), the group's r = min(m, cols - c0) real
//       columns keep their min(n, r) largest scores; ties keep the lower column.
//   column c: q = kept ? w : 0; with bits > 0 kept values are rounded to the symmetric grid
//     code = clamp(rne(q / scale_row), -qmax, qmax), qmax = 2^(bits-1) - 1, q = code * scale_row,
//     scale_row = max_c |w_rc| / qmax of the original row (1 for an all-zero row), or the
//     caller's (given_scales): the updates push kept weights past the original row's largest
//     (2:4 of nn.Linear-initialized rows: ~1.5x), which that grid then clips, so ts.sparsify
//     takes the grid of a float sweep's kept weights instead;
//     e = (w - q) / U_cc; the later columns of the block get w -= e * U_c,later; at the block
//     end the later blocks get W -= E * U_block,later (one matrix product).
// Inputs that never fire (H_cc == 0) are zeroed first and pruned like any zero weight.
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

struct SparseGptOptions {
  int n = 0;                 // n:m keeps n of every m columns; n = 0: unstructured
  int m = 0;
  double sparsity = 0.5;     // unstructured: fraction pruned, in [0, 1)
  int bits = 0;              // 0: float values; 2..8: kept values quantized per row
  bool given_scales = false;  // bits > 0: `scales` holds each row's grid step (read, not written)
  int64_t block_size = 128;  // lazy-update block
  double damp = 0.01;        // added to H's diagonal, as a fraction of its mean
};

struct SparseGptResult {
  double damp_used;  // fraction actually used (raised x10 until Cholesky succeeds)
  double loss;       // sum of e^2 / 2 over rows and columns (the paper's objective)
};

// w: [rows, cols] f32.  h: [cols, cols] f32, symmetric.  out: [rows, cols] f32, the pruned
// (and compensated, and with bits > 0 on-grid) weights.  keep: [rows, cols] uint8, 1 = kept.
// scales: [rows] f32, written when bits > 0 (read instead with given_scales; may be empty when
// bits = 0).  Caller allocates.
SparseGptResult sparsegpt_prune(const TensorView& w, const TensorView& h, const SparseGptOptions& opt,
                                const TensorView& out, const TensorView& keep, const TensorView& scales);

}  // namespace tensorslim
