// The KD loss's scalar inner loops, templated on the float type: the reference the vectorized
// paths are tested against (float) and the float64 path (double). Sums are kept in double so
// the reference is accurate at any vocabulary size.
#include <cmath>
#include <limits>

#include "kd_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

template <class T>
T max_checked(const T* x, int64_t n, bool* nonfinite) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) *nonfinite = true;
    m = std::fmax(m, x[i]);
  }
  return m;
}

template <class T>
void kl_sums(const T* p, const T* q, int64_t n, T mp, T mq, T inv_t, double out[3]) {
  double zp = 0, zq = 0, a = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T xp = (p[i] - mp) * inv_t, xq = (q[i] - mq) * inv_t;
    const T wp = std::exp(xp);
    zp += wp;
    zq += std::exp(xq);
    if (wp > 0) a += static_cast<double>(wp) * (static_cast<double>(xp) - xq);
  }
  out[0] += zp;
  out[1] += zq;
  out[2] += a;
}

template <class T>
double sum_exp(const T* x, int64_t n, T m, T scale) {
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp((x[i] - m) * scale);
  return z;
}

template <class T>
void grad(const T* s, const T* t, int64_t n, const KdGradParamsT<T>& p, T* g) {
  for (int64_t i = 0; i < n; ++i) {
    const T ls = (s[i] - p.ms) * p.inv_t - p.log_zs;  // log p_s
    const T ps = std::exp(ls);
    T v = 0;
    if (p.kd_coef != 0) {
      if (p.reverse) {
        const T lt = (t[i] - p.mt) * p.inv_t - p.log_zt;
        v = ps > 0 ? p.kd_coef * ps * (ls - lt - p.kl) : T(0);
      } else {
        const T pt = p.teacher_term ? std::exp((t[i] - p.mt) * p.inv_t - p.log_zt) : T(0);
        v = p.kd_coef * (ps - pt);
      }
    }
    if (p.ce_coef != 0) v += p.ce_coef * std::exp((s[i] - p.ms) - p.log_z1);
    g[i] = v;
  }
}

}  // namespace

const KdKernels& scalar_kd_kernels() {
  static const KdKernels k{max_checked<float>, kl_sums<float>, sum_exp<float>, grad<float>};
  return k;
}

const KdKernelsT<double>& scalar_kd_kernels_f64() {
  static const KdKernelsT<double> k{max_checked<double>, kl_sums<double>, sum_exp<double>, grad<double>};
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
