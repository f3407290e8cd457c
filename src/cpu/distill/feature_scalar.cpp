// The feature losses' scalar inner loops, templated on the float type: the reference the
// vectorized paths are tested against (float) and the float64 path (double). Sums in double.
#include <algorithm>
#include <cmath>
#include <limits>

#include "feature_kernels.h"

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
double sum_exp(const T* x, int64_t n, T m) {
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp(x[i] - m);
  return z;
}

template <class T>
double sq_diff(const T* s, const T* t, int64_t n) {
  double a = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T d = s[i] - t[i];
    a += static_cast<double>(d) * d;
  }
  return a;
}

template <class T>
void dots(const T* s, const T* t, int64_t n, double out[3]) {
  double ss = 0, tt = 0, st = 0;
  for (int64_t i = 0; i < n; ++i) {
    ss += static_cast<double>(s[i]) * s[i];
    tt += static_cast<double>(t[i]) * t[i];
    st += static_cast<double>(s[i]) * t[i];
  }
  out[0] += ss;
  out[1] += tt;
  out[2] += st;
}

template <class T>
void axpby(const T* s, const T* t, int64_t n, T a, T b, T* g) {
  for (int64_t i = 0; i < n; ++i) g[i] = a * s[i] + b * t[i];
}

// log p and p of one side (see AttnRow).
template <class T>
T log_p(T x, bool logits, T m, T lz) {
  return logits ? (x - m) - lz : std::log(std::max(x, static_cast<T>(kAttnProbFloor)));
}
template <class T>
T p_teacher(T x, const AttnRow<T>& p) {
  return p.t_logits ? std::exp((x - p.mt) - p.lzt) : std::max(x, static_cast<T>(kAttnProbFloor));
}
template <class T>
T p_student(T x, const AttnRow<T>& p) {
  return p.s_logits ? std::exp((x - p.ms) - p.lzs) : x;
}

template <class T>
void attn_kl_sums(const T* s, const T* t, int64_t n, const AttnRow<T>& p, double out[2]) {
  double kl = 0, z = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T lt = log_p(t[i], p.t_logits, p.mt, p.lzt), ls = log_p(s[i], p.s_logits, p.ms, p.lzs);
    const T pt = p_teacher(t[i], p);
    kl += static_cast<double>(pt) * (lt - ls);
    z += pt;
  }
  out[0] += kl;
  out[1] += z;
}

template <class T>
void attn_kl_grad(const T* s, const T* t, int64_t n, const AttnRow<T>& p, T* g) {
  const T floor = static_cast<T>(kAttnProbFloor);
  for (int64_t i = 0; i < n; ++i) {
    const T pt = p_teacher(t[i], p);
    if (p.s_logits) g[i] = p.w * (p_student(s[i], p) * p.c - pt);
    else g[i] = s[i] >= floor ? -p.w * pt / s[i] : T(0);
  }
}

template <class T>
T p_teacher_raw(T x, const AttnRow<T>& p) {
  return p.t_logits ? std::exp((x - p.mt) - p.lzt) : x;
}

template <class T>
void attn_mse_sums(const T* s, const T* t, int64_t n, const AttnRow<T>& p, double out[2]) {
  double sq = 0, c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T ps = p_student(s[i], p), d = ps - p_teacher_raw(t[i], p);
    sq += static_cast<double>(d) * d;
    c += static_cast<double>(ps) * d;
  }
  out[0] += sq;
  out[1] += c;
}

template <class T>
void attn_mse_grad(const T* s, const T* t, int64_t n, const AttnRow<T>& p, T* g) {
  const T w2 = 2 * p.w;
  for (int64_t i = 0; i < n; ++i) {
    const T ps = p_student(s[i], p), d = ps - p_teacher_raw(t[i], p);
    g[i] = p.s_logits ? w2 * ps * (d - p.c) : w2 * d;
  }
}

}  // namespace

template <class T>
const FeatureKernels<T>& scalar_feature_kernels() {
  static const FeatureKernels<T> k{max_checked<T>,  sum_exp<T>,      sq_diff<T>,       dots<T>,      axpby<T>,
                                   attn_kl_sums<T>, attn_kl_grad<T>, attn_mse_sums<T>, attn_mse_grad<T>};
  return k;
}
template const FeatureKernels<float>& scalar_feature_kernels<float>();
template const FeatureKernels<double>& scalar_feature_kernels<double>();

const FeatureKernels<float>& feature_kernels_for(Isa isa) {
#ifdef TENSORSLIM_HAVE_AVX512
  if (isa == Isa::kAVX512) return avx512_feature_kernels();
#endif
#ifdef TENSORSLIM_HAVE_AVX2
  if (isa == Isa::kAVX2) return avx2_feature_kernels();
#endif
  (void)isa;
  return scalar_feature_kernels<float>();
}

}  // namespace cpu
}  // namespace tensorslim
