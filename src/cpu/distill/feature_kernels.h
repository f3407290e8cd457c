// Per-ISA inner loops of the feature-level distillation losses (hidden states and attention
// maps; tensorslim/distill_features.h), each over one chunk of contiguous values of one row.
// The scalar set is the reference, templated on the float type: its double instance is what
// float64 inputs run on (so torch.autograd.gradcheck exercises this code), its float instance
// is what the AVX2 / AVX-512 sets are tested against. Sums are returned in double.
#pragma once

#include <cstdint>

#include "tensorslim/quantize.h"  // Isa

namespace tensorslim {
namespace cpu {

// Probabilities below this are clamped before a log (as the PyTorch expression's clamp_min).
constexpr double kAttnProbFloor = 1e-12;

// One attention row's sides. A side given as scores (logits) has p = exp(x - m - log_z),
// log p = x - m - log_z; a side given as probabilities has p = x for the student and
// p = max(x, floor) for the teacher, log p = log(max(x, floor)).
template <class T>
struct AttnRow {
  bool s_logits, t_logits;
  T ms, lzs, mt, lzt;
  T w;    // backward: d loss / d row loss
  T c;    // backward: KL: sum p_t; MSE from scores: sum p_s (p_s - p_t)
};

template <class T>
struct FeatureKernels {
  // max(x); sets *nonfinite when any value is NaN or +-Inf.
  T (*max_checked)(const T* x, int64_t n, bool* nonfinite);
  // sum exp(x - m)
  double (*sum_exp)(const T* x, int64_t n, T m);
  // sum (s - t)^2
  double (*sq_diff)(const T* s, const T* t, int64_t n);
  // out += {s.s, t.t, s.t}
  void (*dots)(const T* s, const T* t, int64_t n, double out[3]);
  // g = a s + b t
  void (*axpby)(const T* s, const T* t, int64_t n, T a, T b, T* g);
  // out += {sum p_t (log p_t - log p_s), sum p_t}
  void (*attn_kl_sums)(const T* s, const T* t, int64_t n, const AttnRow<T>& p, double out[2]);
  // g = w (p_s c - p_t)   (student scores),   g = -w p_t / s where s >= floor, else 0  (probabilities)
  void (*attn_kl_grad)(const T* s, const T* t, int64_t n, const AttnRow<T>& p, T* g);
  // out += {sum (p_s - p_t)^2, sum p_s (p_s - p_t)}   (p_t unclamped here)
  void (*attn_mse_sums)(const T* s, const T* t, int64_t n, const AttnRow<T>& p, double out[2]);
  // g = 2 w p_s ((p_s - p_t) - c)   (student scores),   g = 2 w (s - p_t)   (probabilities)
  void (*attn_mse_grad)(const T* s, const T* t, int64_t n, const AttnRow<T>& p, T* g);
};

template <class T>
const FeatureKernels<T>& scalar_feature_kernels();
#ifdef TENSORSLIM_HAVE_AVX2
const FeatureKernels<float>& avx2_feature_kernels();
#endif
#ifdef TENSORSLIM_HAVE_AVX512
const FeatureKernels<float>& avx512_feature_kernels();
#endif
const FeatureKernels<float>& feature_kernels_for(Isa isa);

}  // namespace cpu
}  // namespace tensorslim
