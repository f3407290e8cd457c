// Pruning cores: importance scores, k-th smallest thresholds, masks, channel gathers.
//
// Scores are s = |w|^p (p = 1 or 2) in fp32. Non-negative floats order like their bit
// patterns as uint32, which the histogram (radix) selection relies on.
//
//   prune_scores:    scores[i] = |w[i]| (p = 1) or w[i] * w[i] (p = 2), w any float layout
//                    flattened in order; w must hold no NaN (a ValueError otherwise).
//   kth_smallest:    the k-th smallest (1-based) of scores, found by std::nth_element on the
//                    buffer itself (it is reordered): O(n), no second copy.
//   prune_mask:      prunes exactly k entries: every score < t, then ties (== t) in index
//                    order until k are pruned. mask[i] = 1 keeps, 0 prunes. Returns k's
//                    realized count (k unless fewer than k scores are <= t).
//   score_histogram: one radix-select pass: for each score whose bits >> (shift + nbits)
//                    equal `prefix`, hist[(bits >> shift) & (2^nbits - 1)] += 1 (int32,
//                    so at most 2^31 - 1 elements per call). Scores are computed on the fly
//                    from w, so a global threshold over many layers never needs their
//                    scores stored: memory is the histograms alone.
//   gather_rows:     out[i, :] = w[index[i], :] for a [N, K] float matrix (channel removal).
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

void prune_scores(const TensorView& w, int p, const TensorView& scores);
float kth_smallest(const TensorView& scores, int64_t k);
int64_t prune_mask(const TensorView& w, int p, float threshold, int64_t k, const TensorView& mask);
void score_histogram(const TensorView& w, int p, int shift, int nbits, uint32_t prefix,
                     const TensorView& hist);
void gather_rows(const TensorView& w, const TensorView& index, const TensorView& out);

namespace cpu {
// The per-ISA loops over n contiguous floats. mask_* write keep = (s > t) and return
// (#s < t, #s == t); ties are resolved afterwards in index order by the caller.
struct MaskCounts {
  int64_t less = 0;
  int64_t equal = 0;
};
void scores_scalar(const float* w, int64_t n, int p, float* s);
MaskCounts mask_scalar(const float* w, int64_t n, int p, float t, uint8_t* keep);
void scores_avx2(const float* w, int64_t n, int p, float* s);
MaskCounts mask_avx2(const float* w, int64_t n, int p, float t, uint8_t* keep);
void scores_avx512(const float* w, int64_t n, int p, float* s);
MaskCounts mask_avx512(const float* w, int64_t n, int p, float t, uint8_t* keep);
// One radix-select histogram pass (see score_histogram); vector paths filter by prefix and
// compute the bins 8 / 16 at a time, then count the matching lanes in order.
struct HistPass {
  int p, shift, nbits;
  uint32_t prefix;
};
void hist_scalar(const float* w, int64_t n, const HistPass& h, int32_t* hist);
void hist_avx2(const float* w, int64_t n, const HistPass& h, int32_t* hist);
void hist_avx512(const float* w, int64_t n, const HistPass& h, int32_t* hist);
}  // namespace cpu

}  // namespace tensorslim
