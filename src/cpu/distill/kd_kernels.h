// Per-ISA inner loops of the KD loss, each over one chunk of contiguous logits.
// kd_loss.cpp streams rows through them; the scalar set is the reference, templated on the
// float type: its float instance is what the AVX2 / AVX-512 sets are tested against, its
// double instance is what float64 logits run on (so gradcheck exercises the core). Within a chunk
// every quantity is taken relative to the running row maxima m (so exp never overflows):
// x = (logit - m) * inv_t.
#pragma once

#include <cstdint>

#include "tensorslim/quantize.h"  // Isa

namespace tensorslim {
namespace cpu {

template <class T>
struct KdGradParamsT {
  T ms, mt, inv_t;        // row maxima and 1 / T
  T log_zs, log_zt;       // log partition functions of s/T and t/T (relative to ms, mt)
  T log_z1;               // of s at T = 1 (relative to ms), for the CE term
  T kd_coef;              // row_scale * alpha * T   (0: no KD term)
  T ce_coef;              // row_scale * (1 - alpha) (0: no CE term)
  T kl;                   // the row's KL, needed by the reverse gradient
  bool reverse;
  bool teacher_term;      // false under top_k: the driver subtracts p_t at the k tokens
};
using KdGradParams = KdGradParamsT<float>;

template <class T>
struct KdKernelsT {
  // max(x); sets *nonfinite when any value is NaN or +-Inf.
  T (*max_checked)(const T* x, int64_t n, bool* nonfinite);
  // With wp = exp(xp): out[0] = sum wp, out[1] = sum exp(xq), out[2] = sum wp * (xp - xq),
  // where xp = (p - mp) * inv_t, xq = (q - mq) * inv_t; terms with wp == 0 add nothing.
  void (*kl_sums)(const T* p, const T* q, int64_t n, T mp, T mq, T inv_t, double out[3]);
  // sum exp((x - m) * scale)
  double (*sum_exp)(const T* x, int64_t n, T m, T scale);
  // g[i] = kd_coef * (p_s - p_t)                            forward KL
  //      = kd_coef * p_s * (log p_s - log p_t - kl)         reverse KL
  //      + ce_coef * softmax(s)[i]                           (the -ce_coef at the label: driver)
  void (*grad)(const T* s, const T* t, int64_t n, const KdGradParamsT<T>& p, T* g);
};
using KdKernels = KdKernelsT<float>;

const KdKernels& scalar_kd_kernels();
const KdKernelsT<double>& scalar_kd_kernels_f64();
#ifdef TENSORSLIM_HAVE_AVX2
const KdKernels& avx2_kd_kernels();
#endif
#ifdef TENSORSLIM_HAVE_AVX512
const KdKernels& avx512_kd_kernels();
#endif
const KdKernels& kd_kernels_for(Isa isa);

}  // namespace cpu
}  // namespace tensorslim
