// exp and log on fp32 lanes over the vector interface V (simd_avx2.h / simd_avx512.h), shared
// by the KD loops (kd_simd.h) and the feature-loss loops (feature_simd.h).
#pragma once

namespace tensorslim {
namespace cpu {
namespace simd {

// exp(x): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to degree 7
// (truncation error < 6e-9 relative), times 2^n built in the exponent bits.
// x is clamped to [-88, 88]; below about -87.7 the result is 0 (n = -127 gives 2^n = 0).
template <class V>
inline typename V::F vexp(typename V::F x) {
  using F = typename V::F;
  x = V::min(V::max(x, V::set1(-88.0f)), V::set1(88.0f));
  const F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  F r = V::fnmadd(n, V::set1(0.693145751953125f), x);     // ln2 split in a high part exact
  r = V::fnmadd(n, V::set1(1.42860682030941723212e-06f), r);  // in fp32 and the rest
  F p = V::set1(1.0f / 5040);
  p = V::fmadd(p, r, V::set1(1.0f / 720));
  p = V::fmadd(p, r, V::set1(1.0f / 120));
  p = V::fmadd(p, r, V::set1(1.0f / 24));
  p = V::fmadd(p, r, V::set1(1.0f / 6));
  p = V::fmadd(p, r, V::set1(0.5f));
  p = V::fmadd(p, r, V::set1(1.0f));
  p = V::fmadd(p, r, V::set1(1.0f));
  return V::mul(p, V::pow2(n));
}

// log(x) for positive normal x (callers clamp to >= 1e-12 first): x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log m = 2 atanh(u) with u = (m - 1) / (m + 1), |u| <= 0.172, by its
// series to u^9 (truncation error < 1e-9); e ln2 added with ln2 split as in vexp.
template <class V>
inline typename V::F vlog(typename V::F x) {
  using F = typename V::F;
  const F one = V::set1(1.0f), sqrt2 = V::set1(1.41421356237f);
  F e = V::exponent(x), m = V::mantissa(x);
  e = V::select_gt(m, sqrt2, V::add(e, one), e);
  m = V::select_gt(m, sqrt2, V::mul(m, V::set1(0.5f)), m);
  const F u = V::div(V::sub(m, one), V::add(m, one));
  const F u2 = V::mul(u, u);
  F p = V::set1(2.0f / 9);
  p = V::fmadd(p, u2, V::set1(2.0f / 7));
  p = V::fmadd(p, u2, V::set1(2.0f / 5));
  p = V::fmadd(p, u2, V::set1(2.0f / 3));
  p = V::fmadd(p, u2, V::set1(2.0f));
  const F lm = V::mul(p, u);
  return V::fmadd(e, V::set1(0.693145751953125f), V::fmadd(e, V::set1(1.42860682030941723212e-06f), lm));
}

}  // namespace simd
}  // namespace cpu
}  // namespace tensorslim
