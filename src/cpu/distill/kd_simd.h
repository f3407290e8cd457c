// The KD inner loops written once over a small vector interface V (simd_avx2.h,
// simd_avx512.h; kd_avx2.cpp and kd_avx512.cpp instantiate them with their own ISA flags). Within a
// chunk, lanes accumulate in fp32 (at most a few thousand terms); chunks add up in double.
#pragma once

#include <cmath>
#include <limits>

#include "kd_kernels.h"
#include "simd_math.h"

namespace tensorslim {
namespace cpu {
namespace kd_simd {

using simd::vexp;

template <class V>
float max_checked(const float* x, int64_t n, bool* nonfinite) {
  using F = typename V::F;
  F m = V::set1(-std::numeric_limits<float>::infinity()), chk = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const F v = V::load(x + i);
    m = V::max(m, v);
    chk = V::add(chk, V::sub(v, v));  // x - x is NaN exactly for NaN and +-Inf
  }
  float mm = V::hmax(m);
  float c = V::hsum(chk);
  for (; i < n; ++i) {
    c += x[i] - x[i];
    mm = std::fmax(mm, x[i]);
  }
  if (c != 0.0f) *nonfinite = true;
  return mm;
}

template <class V>
void kl_sums(const float* p, const float* q, int64_t n, float mp, float mq, float inv_t, double out[3]) {
  using F = typename V::F;
  const F vmp = V::set1(mp), vmq = V::set1(mq), vit = V::set1(inv_t), zero = V::set1(0.0f);
  F zp = zero, zq = zero, a = zero;
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const F xp = V::mul(V::sub(V::load(p + i), vmp), vit);
    const F xq = V::mul(V::sub(V::load(q + i), vmq), vit);
    const F wp = vexp<V>(xp);
    zp = V::add(zp, wp);
    zq = V::add(zq, vexp<V>(xq));
    a = V::add(a, V::select_gt0(wp, V::mul(wp, V::sub(xp, xq))));
  }
  double szp = V::hsum(zp), szq = V::hsum(zq), sa = V::hsum(a);
  for (; i < n; ++i) {
    const float xp = (p[i] - mp) * inv_t, xq = (q[i] - mq) * inv_t, wp = std::exp(xp);
    szp += wp;
    szq += std::exp(xq);
    if (wp > 0.0f) sa += static_cast<double>(wp) * (xp - xq);
  }
  out[0] += szp;
  out[1] += szq;
  out[2] += sa;
}

template <class V>
double sum_exp(const float* x, int64_t n, float m, float scale) {
  using F = typename V::F;
  const F vm = V::set1(m), vs = V::set1(scale);
  F z = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) z = V::add(z, vexp<V>(V::mul(V::sub(V::load(x + i), vm), vs)));
  double sz = V::hsum(z);
  for (; i < n; ++i) sz += std::exp((x[i] - m) * scale);
  return sz;
}

template <class V, bool kReverse, bool kTeacher, bool kCe>
void grad_impl(const float* s, const float* t, int64_t n, const KdGradParams& p, float* g, int64_t& i) {
  using F = typename V::F;
  const F ms = V::set1(p.ms), mt = V::set1(p.mt), it = V::set1(p.inv_t), lzs = V::set1(p.log_zs),
          lzt = V::set1(p.log_zt), lz1 = V::set1(p.log_z1), kd = V::set1(p.kd_coef),
          ce = V::set1(p.ce_coef), kl = V::set1(p.kl);
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const F sv = V::load(s + i);
    const F ls = V::sub(V::mul(V::sub(sv, ms), it), lzs);
    const F ps = vexp<V>(ls);
    F v;
    if (kReverse) {
      const F lt = V::sub(V::mul(V::sub(V::load(t + i), mt), it), lzt);
      v = V::select_gt0(ps, V::mul(kd, V::mul(ps, V::sub(V::sub(ls, lt), kl))));
    } else if (kTeacher) {
      const F pt = vexp<V>(V::sub(V::mul(V::sub(V::load(t + i), mt), it), lzt));
      v = V::mul(kd, V::sub(ps, pt));
    } else {
      v = V::mul(kd, ps);
    }
    if (kCe) v = V::fmadd(ce, vexp<V>(V::sub(V::sub(sv, ms), lz1)), v);
    V::store(g + i, v);
  }
}

template <class V>
void grad(const float* s, const float* t, int64_t n, const KdGradParams& p, float* g) {
  int64_t i = 0;
  const bool ce = p.ce_coef != 0.0f;
  if (p.reverse) {
    ce ? grad_impl<V, true, false, true>(s, t, n, p, g, i) : grad_impl<V, true, false, false>(s, t, n, p, g, i);
  } else if (p.teacher_term) {
    ce ? grad_impl<V, false, true, true>(s, t, n, p, g, i) : grad_impl<V, false, true, false>(s, t, n, p, g, i);
  } else {
    ce ? grad_impl<V, false, false, true>(s, t, n, p, g, i) : grad_impl<V, false, false, false>(s, t, n, p, g, i);
  }
  if (i < n) scalar_kd_kernels().grad(s + i, t + i, n - i, p, g + i);  // the tail
}

template <class V>
const KdKernels& kernels() {
  static const KdKernels k{max_checked<V>, kl_sums<V>, sum_exp<V>, grad<V>};
  return k;
}

}  // namespace kd_simd
}  // namespace cpu
}  // namespace tensorslim
