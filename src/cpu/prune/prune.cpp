// Pruning cores (see include/tensorslim/prune.h): argument checks, the ISA dispatch of the
// score and mask loops, selection, histograms and channel gathers.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "tensorslim/prune.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace {

void check_p(int p, const char* fn) {
  TS_CHECK_VALUE(p == 1 || p == 2, std::string(fn) + ": norm p must be 1 or 2, got " + std::to_string(p));
}

void check_flat_f32(const TensorView& t, const char* fn, const char* what) {
  TS_CHECK_TYPE(t.device == DeviceType::kCPU, std::string(fn) + ": " + what + " must be on the CPU");
  TS_CHECK_TYPE(t.dtype == DType::kFloat32,
                std::string(fn) + ": " + what + " must be float32, got " + dtype_name(t.dtype));
  TS_CHECK_VALUE(t.is_contiguous(), std::string(fn) + ": " + what + " must be contiguous");
}

void check_same_numel(const TensorView& a, const TensorView& b, const char* fn, const char* what) {
  TS_CHECK_VALUE(a.numel() == b.numel(), std::string(fn) + ": " + what + " must have " +
                                             std::to_string(a.numel()) + " elements, got " + shape_str(b));
}

cpu::Isa isa() { return cpu::active_isa(); }

}  // namespace

namespace cpu {

// The specification: |w| clears the sign bit, so every path gives the same bits.
static inline float score_of(float w, int p) { return p == 1 ? std::fabs(w) : w * w; }

void scores_scalar(const float* w, int64_t n, int p, float* s) {
  for (int64_t i = 0; i < n; ++i) s[i] = score_of(w[i], p);
}

MaskCounts mask_scalar(const float* w, int64_t n, int p, float t, uint8_t* keep) {
  MaskCounts c;
  for (int64_t i = 0; i < n; ++i) {
    const float s = score_of(w[i], p);
    keep[i] = s > t ? 1 : 0;
    c.less += s < t;
    c.equal += s == t;
  }
  return c;
}

void hist_scalar(const float* w, int64_t n, const HistPass& h, int32_t* hist) {
  const int top = h.shift + h.nbits;
  const uint32_t bin_mask = (uint32_t{1} << h.nbits) - 1u;
  for (int64_t i = 0; i < n; ++i) {
    const float s = score_of(w[i], h.p);
    uint32_t bits;
    std::memcpy(&bits, &s, 4);
    const uint32_t high = top >= 32 ? 0u : bits >> top;  // >> 32 is undefined in C++
    if (high == h.prefix) ++hist[(bits >> h.shift) & bin_mask];
  }
}

}  // namespace cpu

void prune_scores(const TensorView& w, int p, const TensorView& scores) {
  check_p(p, "prune_scores");
  check_flat_f32(w, "prune_scores", "w");
  check_flat_f32(scores, "prune_scores", "scores");
  check_same_numel(w, scores, "prune_scores", "scores");
  const float* src = w.ptr<float>();
  float* dst = scores.ptr<float>();
  const int64_t n = w.numel();
  switch (isa()) {
    case cpu::Isa::kAVX512: cpu::scores_avx512(src, n, p, dst); break;
    case cpu::Isa::kAVX2: cpu::scores_avx2(src, n, p, dst); break;
    default: cpu::scores_scalar(src, n, p, dst);
  }
}

float kth_smallest(const TensorView& scores, int64_t k) {
  check_flat_f32(scores, "kth_smallest", "scores");
  const int64_t n = scores.numel();
  TS_CHECK_VALUE(k >= 1 && k <= n, "kth_smallest: k must be in [1, " + std::to_string(n) + "], got " +
                                       std::to_string(k));
  float* s = scores.ptr<float>();
  std::nth_element(s, s + (k - 1), s + n);  // selection, not a sort: O(n) on average
  return s[k - 1];
}

int64_t prune_mask(const TensorView& w, int p, float threshold, int64_t k, const TensorView& mask) {
  check_p(p, "prune_mask");
  check_flat_f32(w, "prune_mask", "w");
  TS_CHECK_TYPE(mask.dtype == DType::kUInt8 && mask.device == DeviceType::kCPU,
                std::string("prune_mask: mask must be a CPU uint8 tensor, got ") + dtype_name(mask.dtype));
  TS_CHECK_VALUE(mask.is_contiguous(), "prune_mask: mask must be contiguous");
  check_same_numel(w, mask, "prune_mask", "mask");
  const int64_t n = w.numel();
  TS_CHECK_VALUE(k >= 0 && k <= n, "prune_mask: k must be in [0, " + std::to_string(n) + "], got " +
                                       std::to_string(k));
  const float* src = w.ptr<float>();
  uint8_t* keep = mask.ptr<uint8_t>();
  cpu::MaskCounts c;
  switch (isa()) {
    case cpu::Isa::kAVX512: c = cpu::mask_avx512(src, n, p, threshold, keep); break;
    case cpu::Isa::kAVX2: c = cpu::mask_avx2(src, n, p, threshold, keep); break;
    default: c = cpu::mask_scalar(src, n, p, threshold, keep);
  }
  // Ties at the threshold: the first (k - less) in index order are pruned, the rest kept,
  // so exactly k go whatever the number of equal scores (zeros of an earlier pruning, say).
  const int64_t quota = std::max<int64_t>(0, std::min(k - c.less, c.equal));
  if (c.equal > quota) {
    int64_t seen = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (cpu::score_of(src[i], p) == threshold && seen++ >= quota) keep[i] = 1;
    }
  }
  return c.less + quota;
}

void score_histogram(const TensorView& w, int p, int shift, int nbits, uint32_t prefix,
                     const TensorView& hist) {
  check_p(p, "score_histogram");
  check_flat_f32(w, "score_histogram", "w");
  TS_CHECK_VALUE(nbits >= 1 && nbits <= 16 && shift >= 0 && shift <= 32 - nbits,  // no int overflow
                 "score_histogram: need 1 <= nbits <= 16 and shift + nbits <= 32");
  TS_CHECK_TYPE(hist.dtype == DType::kInt32 && hist.device == DeviceType::kCPU && hist.is_contiguous(),
                "score_histogram: hist must be a contiguous CPU int32 tensor");
  TS_CHECK_VALUE(hist.numel() == (int64_t{1} << nbits),
                 "score_histogram: hist must have 2^nbits = " + std::to_string(1 << nbits) +
                     " bins, got " + shape_str(hist));
  TS_CHECK_VALUE(w.numel() < (int64_t{1} << 31), "score_histogram: at most 2^31 - 1 elements per call");
  const cpu::HistPass pass{p, shift, nbits, prefix};
  const float* src = w.ptr<float>();
  int32_t* h = hist.ptr<int32_t>();
  const int64_t n = w.numel();
  switch (isa()) {
    case cpu::Isa::kAVX512: cpu::hist_avx512(src, n, pass, h); break;
    case cpu::Isa::kAVX2: cpu::hist_avx2(src, n, pass, h); break;
    default: cpu::hist_scalar(src, n, pass, h);
  }
}

void gather_rows(const TensorView& w, const TensorView& index, const TensorView& out) {
  TS_CHECK_TYPE(w.device == DeviceType::kCPU && w.dtype == DType::kFloat32 && w.ndim == 2,
                "gather_rows: w must be a 2-D CPU float32 tensor");
  TS_CHECK_VALUE(w.strides[1] == 1 || w.shape[1] <= 1, "gather_rows: w rows must be contiguous");
  TS_CHECK_TYPE(index.dtype == DType::kInt32 && index.ndim == 1 && index.is_contiguous(),
                "gather_rows: index must be a contiguous 1-D int32 tensor");
  const int64_t rows = index.shape[0], cols = w.shape[1];
  check_flat_f32(out, "gather_rows", "out");
  check_shape2(out, rows, cols, "gather_rows: out");
  const int32_t* idx = index.ptr<int32_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TS_CHECK_VALUE(idx[i] >= 0 && idx[i] < w.shape[0],
                   "gather_rows: index " + std::to_string(idx[i]) + " out of range [0, " +
                       std::to_string(w.shape[0]) + ")");
  }
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(out.ptr<float>() + i * cols, w.ptr<float>() + idx[i] * w.strides[0], cols * sizeof(float));
  }
}

}  // namespace tensorslim
