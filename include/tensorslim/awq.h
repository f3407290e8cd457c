// AWQ (Lin et al., 2023) searches, the inner loops of activation-aware weight quantization.
//
// The layers that read one input are stacked into w [rows, cols]; g = X^T X / n [cols, cols]
// is the Gram matrix of their calibration inputs, so for a weight error d (one row) the mean
// squared output error is d^T g d. Quantization follows the fp32 round-to-nearest rules of
// quantize.h for any bit width (grid from int_grid in gptq.h).
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

struct AwqQuant {
  int bits = 4;
  bool symmetric = true;
  int64_t group_size = 128;
};

// Scale search: for k in [0, n_grid), alpha = k / n_grid, s = max(act, 1e-4)^alpha,
// s /= sqrt(max s * min s); loss_k = sum_rows d^T g d / rows with d = w - Q(w * s) / s.
// act: [cols] f32 (mean |x| per input channel).  losses: [n_grid] f32 out.
// Returns the best k (the first minimum).
int64_t awq_search_scale(const TensorView& w, const TensorView& g, const TensorView& act,
                         const AwqQuant& q, int64_t n_grid, const TensorView& losses);

// Clip search, per (row, group): ratio_k = 1 - k / n_grid for k in [0, n_ratios) with
// n_ratios = floor(n_grid * max_shrink) (20 and 0.5: 1.0, 0.95, ..., 0.55); the group's range [lo, hi] shrinks to
// [lo * r, hi * r] (values beyond it clamp); loss = d_g^T g_gg d_g (the group's own block of g).
// best_ratio: [rows, groups] f32 out.  losses: [rows, groups, n_ratios] f32 out.
void awq_search_clip(const TensorView& w, const TensorView& g, const AwqQuant& q, int64_t n_grid,
                     double max_shrink, const TensorView& best_ratio, const TensorView& losses);

}  // namespace tensorslim
