// Per-ISA inner loops of the KD loss, each over one chunk of contiguous fp32 logits.
// kd_loss.cpp streams rows through them; the scalar set is the reference. Within a chunk
// every quantity is taken relative to the running row maxima m (so exp never overflows):
// x = (logit - m) * inv_t.
#pragma once

#include <cstdint>

#include "tensorslim/quantize.h"  // Isa

namespace tensorslim {
namespace cpu {

struct KdGradParams {
  float ms, mt, inv_t;        // row maxima and 1 / T
  float log_zs, log_zt;       // log partition functions of s/T and t/T (relative to ms, mt)
  float log_z1;               // of s at T = 1 (relative to ms), for the CE term
  float kd_coef;              // row_scale * alpha * T   (0: no KD term)
  float ce_coef;              // row_scale * (1 - alpha) (0: no CE term)
  float kl;                   // the row's KL, needed by the reverse gradient
  bool reverse;
  bool teacher_term;          // false under top_k: the driver subtracts p_t at the k tokens
};

struct KdKernels {
  // max(x); sets *nonfinite when any value is NaN or +-Inf.
  float (*max_checked)(const float* x, int64_t n, bool* nonfinite);
  // With wp = exp(xp): out[0] = sum wp, out[1] = sum exp(xq), out[2] = sum wp * (xp - xq),
  // where xp = (p - mp) * inv_t, xq = (q - mq) * inv_t; terms with wp == 0 add nothing.
  void (*kl_sums)(const float* p, const float* q, int64_t n, float mp, float mq, float inv_t,
                  double out[3]);
  // sum exp((x - m) * scale)
  double (*sum_exp)(const float* x, int64_t n, float m, float scale);
  // g[i] = kd_coef * (p_s - p_t)                            forward KL
  //      = kd_coef * p_s * (log p_s - log p_t - kl)         reverse KL
  //      + ce_coef * softmax(s)[i]                           (the -ce_coef at the label: driver)
  void (*grad)(const float* s, const float* t, int64_t n, const KdGradParams& p, float* g);
};

const KdKernels& scalar_kd_kernels();
#ifdef TENSORSLIM_HAVE_AVX2
const KdKernels& avx2_kd_kernels();
#endif
#ifdef TENSORSLIM_HAVE_AVX512
const KdKernels& avx512_kd_kernels();
#endif
const KdKernels& kd_kernels_for(Isa isa);

}  // namespace cpu
}  // namespace tensorslim
