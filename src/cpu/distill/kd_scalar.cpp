// The KD loss's scalar inner loops: the reference the vectorized paths are tested against.
// Sums are kept in double so the reference is accurate at any vocabulary size.
#include <cmath>
#include <limits>

#include "kd_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

float max_checked(const float* x, int64_t n, bool* nonfinite) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) *nonfinite = true;
    m = std::fmax(m, x[i]);
  }
  return m;
}

void kl_sums(const float* p, const float* q, int64_t n, float mp, float mq, float inv_t, double out[3]) {
  double zp = 0, zq = 0, a = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float xp = (p[i] - mp) * inv_t, xq = (q[i] - mq) * inv_t;
    const float wp = std::exp(xp);
    zp += wp;
    zq += std::exp(xq);
    if (wp > 0.0f) a += static_cast<double>(wp) * (static_cast<double>(xp) - xq);
  }
  out[0] += zp;
  out[1] += zq;
  out[2] += a;
}

double sum_exp(const float* x, int64_t n, float m, float scale) {
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp((x[i] - m) * scale);
  return z;
}

void grad(const float* s, const float* t, int64_t n, const KdGradParams& p, float* g) {
  for (int64_t i = 0; i < n; ++i) {
    const float ls = (s[i] - p.ms) * p.inv_t - p.log_zs;  // log p_s
    const float ps = std::exp(ls);
    float v = 0.0f;
    if (p.kd_coef != 0.0f) {
      if (p.reverse) {
        const float lt = (t[i] - p.mt) * p.inv_t - p.log_zt;
        v = ps > 0.0f ? p.kd_coef * ps * (ls - lt - p.kl) : 0.0f;
      } else {
        const float pt = p.teacher_term ? std::exp((t[i] - p.mt) * p.inv_t - p.log_zt) : 0.0f;
        v = p.kd_coef * (ps - pt);
      }
    }
    if (p.ce_coef != 0.0f) v += p.ce_coef * std::exp((s[i] - p.ms) - p.log_z1);
    g[i] = v;
  }
}

}  // namespace

const KdKernels& scalar_kd_kernels() {
  static const KdKernels k{max_checked, kl_sums, sum_exp, grad};
  return k;
}

const KdKernels& kd_kernels_for(Isa isa) {
#ifdef TENSORSLIM_HAVE_AVX512
  if (isa == Isa::kAVX512) return avx512_kd_kernels();
#endif
#ifdef TENSORSLIM_HAVE_AVX2
  if (isa == Isa::kAVX2) return avx2_kd_kernels();
#endif
  (void)isa;
  return scalar_kd_kernels();
}

}  // namespace cpu
}  // namespace tensorslim
