// The feature losses' inner loops written once over the vector interface V (simd_avx2.h,
// simd_avx512.h); feature_avx2.cpp and feature_avx512.cpp instantiate them with their own ISA
// flags. Within a chunk lanes accumulate in fp32 (the driver's chunks are at most a few
// thousand values); the chunk sums are returned in double. Tails run the scalar reference.
#pragma once

#include <cmath>
#include <limits>

#include "feature_kernels.h"
#include "simd_math.h"

namespace tensorslim {
namespace cpu {
namespace feature_simd {

using simd::vexp;
using simd::vlog;

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
  if (V::hsum(chk) != 0.0f) *nonfinite = true;
  bool bad = false;
  if (i < n) mm = std::fmax(mm, scalar_feature_kernels<float>().max_checked(x + i, n - i, &bad));
  if (bad) *nonfinite = true;
  return mm;
}

template <class V>
double sum_exp(const float* x, int64_t n, float m) {
  using F = typename V::F;
  const F vm = V::set1(m);
  F z = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) z = V::add(z, vexp<V>(V::sub(V::load(x + i), vm)));
  return V::hsum(z) + scalar_feature_kernels<float>().sum_exp(x + i, n - i, m);
}

template <class V>
double sq_diff(const float* s, const float* t, int64_t n) {
  using F = typename V::F;
  F a = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const F d = V::sub(V::load(s + i), V::load(t + i));
    a = V::fmadd(d, d, a);
  }
  return V::hsum(a) + scalar_feature_kernels<float>().sq_diff(s + i, t + i, n - i);
}

template <class V>
void dots(const float* s, const float* t, int64_t n, double out[3]) {
  using F = typename V::F;
  F ss = V::set1(0.0f), tt = ss, st = ss;
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const F a = V::load(s + i), b = V::load(t + i);
    ss = V::fmadd(a, a, ss);
    tt = V::fmadd(b, b, tt);
    st = V::fmadd(a, b, st);
  }
  out[0] += V::hsum(ss);
  out[1] += V::hsum(tt);
  out[2] += V::hsum(st);
  scalar_feature_kernels<float>().dots(s + i, t + i, n - i, out);
}

template <class V>
void axpby(const float* s, const float* t, int64_t n, float a, float b, float* g) {
  using F = typename V::F;
  const F va = V::set1(a), vb = V::set1(b);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) V::store(g + i, V::fmadd(va, V::load(s + i), V::mul(vb, V::load(t + i))));
  scalar_feature_kernels<float>().axpby(s + i, t + i, n - i, a, b, g + i);
}

// One side's log p (see AttnRow); a probability side is clamped to the floor first.
template <class V, bool kLogits>
typename V::F log_p(typename V::F x, typename V::F m, typename V::F lz) {
  if (kLogits) return V::sub(V::sub(x, m), lz);
  return vlog<V>(V::max(x, V::set1(static_cast<float>(kAttnProbFloor))));
}

template <class V, bool kSL, bool kTL>
void attn_kl_sums_impl(const float* s, const float* t, int64_t n, const AttnRow<float>& p, double out[2]) {
  using F = typename V::F;
  const F ms = V::set1(p.ms), lzs = V::set1(p.lzs), mt = V::set1(p.mt), lzt = V::set1(p.lzt);
  F kl = V::set1(0.0f), z = kl;
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const F tv = V::load(t + i);
    const F lt = log_p<V, kTL>(tv, mt, lzt), ls = log_p<V, kSL>(V::load(s + i), ms, lzs);
    const F pt = kTL ? vexp<V>(lt) : V::max(tv, V::set1(static_cast<float>(kAttnProbFloor)));
    kl = V::fmadd(pt, V::sub(lt, ls), kl);
    z = V::add(z, pt);
  }
  out[0] += V::hsum(kl);
  out[1] += V::hsum(z);
  scalar_feature_kernels<float>().attn_kl_sums(s + i, t + i, n - i, p, out);
}

template <class V, bool kSL, bool kTL>
void attn_kl_grad_impl(const float* s, const float* t, int64_t n, const AttnRow<float>& p, float* g) {
  using F = typename V::F;
  const F ms = V::set1(p.ms), lzs = V::set1(p.lzs), mt = V::set1(p.mt), lzt = V::set1(p.lzt), w = V::set1(p.w),
          c = V::set1(p.c), floor = V::set1(static_cast<float>(kAttnProbFloor)), zero = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const F tv = V::load(t + i), sv = V::load(s + i);
    const F pt = kTL ? vexp<V>(V::sub(V::sub(tv, mt), lzt)) : V::max(tv, floor);
    F v;
    if (kSL) {
      v = V::mul(w, V::fnmadd(V::set1(1.0f), pt, V::mul(vexp<V>(V::sub(V::sub(sv, ms), lzs)), c)));
    } else {  // -w pt / s where s >= floor (floor > s gives 0)
      v = V::select_gt(floor, sv, zero, V::div(V::mul(V::sub(zero, w), pt), sv));
    }
    V::store(g + i, v);
  }
  scalar_feature_kernels<float>().attn_kl_grad(s + i, t + i, n - i, p, g + i);
}

template <class V, bool kSL, bool kTL>
void attn_mse_sums_impl(const float* s, const float* t, int64_t n, const AttnRow<float>& p, double out[2]) {
  using F = typename V::F;
  const F ms = V::set1(p.ms), lzs = V::set1(p.lzs), mt = V::set1(p.mt), lzt = V::set1(p.lzt);
  F sq = V::set1(0.0f), c = sq;
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    F ps = V::load(s + i), pt = V::load(t + i);
    if (kSL) ps = vexp<V>(V::sub(V::sub(ps, ms), lzs));
    if (kTL) pt = vexp<V>(V::sub(V::sub(pt, mt), lzt));
    const F d = V::sub(ps, pt);
    sq = V::fmadd(d, d, sq);
    c = V::fmadd(ps, d, c);
  }
  out[0] += V::hsum(sq);
  out[1] += V::hsum(c);
  scalar_feature_kernels<float>().attn_mse_sums(s + i, t + i, n - i, p, out);
}

template <class V, bool kSL, bool kTL>
void attn_mse_grad_impl(const float* s, const float* t, int64_t n, const AttnRow<float>& p, float* g) {
  using F = typename V::F;
  const F ms = V::set1(p.ms), lzs = V::set1(p.lzs), mt = V::set1(p.mt), lzt = V::set1(p.lzt),
          w2 = V::set1(2 * p.w), c = V::set1(p.c);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    F ps = V::load(s + i), pt = V::load(t + i);
    if (kSL) ps = vexp<V>(V::sub(V::sub(ps, ms), lzs));
    if (kTL) pt = vexp<V>(V::sub(V::sub(pt, mt), lzt));
    const F d = V::sub(ps, pt);
    V::store(g + i, kSL ? V::mul(V::mul(w2, ps), V::sub(d, c)) : V::mul(w2, d));
  }
  scalar_feature_kernels<float>().attn_mse_grad(s + i, t + i, n - i, p, g + i);
}

// The four (student, teacher) x (scores, probabilities) instances behind one entry point.
#define TS_ATTN_DISPATCH(name, Out)                                                                          \
  template <class V>                                                                                       \
  void name(const float* s, const float* t, int64_t n, const AttnRow<float>& p, Out o) {                  \
    if (p.s_logits) p.t_logits ? name##_impl<V, true, true>(s, t, n, p, o) : name##_impl<V, true, false>(s, t, n, p, o); \
    else p.t_logits ? name##_impl<V, false, true>(s, t, n, p, o) : name##_impl<V, false, false>(s, t, n, p, o);         \
  }
TS_ATTN_DISPATCH(attn_kl_sums, double*)
TS_ATTN_DISPATCH(attn_kl_grad, float*)
TS_ATTN_DISPATCH(attn_mse_sums, double*)
TS_ATTN_DISPATCH(attn_mse_grad, float*)
#undef TS_ATTN_DISPATCH

template <class V>
const FeatureKernels<float>& kernels() {
  static const FeatureKernels<float> k{max_checked<V>,  sum_exp<V>,      sq_diff<V>,       dots<V>,      axpby<V>,
                                       attn_kl_sums<V>, attn_kl_grad<V>, attn_mse_sums<V>, attn_mse_grad<V>};
  return k;
}

}  // namespace feature_simd
}  // namespace cpu
}  // namespace tensorslim
