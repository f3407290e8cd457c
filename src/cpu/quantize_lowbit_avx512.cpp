// AVX-512 pieces of quantize_lowbit: group min/max and the per-value encoders, bit-exact
// with the scalar rows of the format table (tests compare every format on every ISA).
#include <immintrin.h>

#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// Small-float code of x (finite): the same steps as the scalar encode_magnitude. The
// exponent field gives floor(log2 |x|) for normals; float subnormals read as -127 and,
// like the scalar frexp result, are clamped to the format's subnormal exponent.
template <int M, int B, int kSignBit>
inline __m512i encode_float(__m512 x, int max_code, float max_value) {
  const __m512i xb = _mm512_castps_si512(x);
  const __m512 a = _mm512_abs_ps(x);
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), _mm512_set1_epi32(127));
  e = _mm512_max_epi32(e, _mm512_set1_epi32(1 - B));
  const __m512 pow2 = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(_mm512_set1_epi32(M), e), _mm512_set1_epi32(127)), 23));
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(a, pow2), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512i code = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(B - 1)), M),
                                  _mm512_cvtps_epi32(q));
  code = _mm512_min_epi32(code, _mm512_set1_epi32(max_code));
  code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(a, _mm512_set1_ps(max_value), _CMP_GE_OQ),
                               _mm512_set1_epi32(max_code));
  const __m512i sign = _mm512_srli_epi32(_mm512_and_si512(xb, _mm512_set1_epi32(INT32_MIN)), 31 - kSignBit);
  return _mm512_or_si512(code, sign);
}

template <class Fn>
inline void for_each16(const float* x, int64_t n, int32_t* codes, Fn&& fn) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_epi32(codes + i, m, fn(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

}  // namespace

bool lowbit_min_max_avx512(const float* x, int64_t n, float* lo, float* hi) {
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(_mm512_castps_si512(v), exp_mask), exp_mask);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  *lo = _mm512_reduce_min_ps(vlo);
  *hi = _mm512_reduce_max_ps(vhi);
  return bad == 0;
}

bool lowbit_encode_avx512(const FormatInfo& info, float scale, int32_t zero_point, float threshold,
                          const float* x, int64_t n, int32_t* codes) {
  const __m512 s = _mm512_set1_ps(scale);
  switch (info.format) {
    case Format::kFP8E4M3:
      for_each16(x, n, codes, [&](__m512 v) { return encode_float<3, 7, 7>(_mm512_div_ps(v, s), 0x7E, 448.0f); });
      return true;
    case Format::kFP8E5M2:
      for_each16(x, n, codes, [&](__m512 v) { return encode_float<2, 15, 7>(_mm512_div_ps(v, s), 0x7B, 57344.0f); });
      return true;
    case Format::kNVFP4:
    case Format::kMXFP4:
      if (!(scale > 0.0f)) {  // as the scalar row: no scale, every code 0
        for_each16(x, n, codes, [](__m512) { return _mm512_setzero_si512(); });
        return true;
      }
      for_each16(x, n, codes, [&](__m512 v) { return encode_float<1, 1, 3>(_mm512_div_ps(v, s), 0x7, 6.0f); });
      return true;
    case Format::kBinary:  // x < 0 -> 0, else 1 (zero -> +1)
      for_each16(x, n, codes, [](__m512 v) {
        return _mm512_mask_mov_epi32(_mm512_set1_epi32(1), _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ),
                                     _mm512_setzero_si512());
      });
      return true;
    case Format::kTernary: {
      const __m512 t = _mm512_set1_ps(threshold), mt = _mm512_set1_ps(-threshold);
      for_each16(x, n, codes, [&](__m512 v) {
        __m512i c = _mm512_mask_mov_epi32(_mm512_setzero_si512(), _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ),
                                          _mm512_set1_epi32(1));
        return _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(v, mt, _CMP_LT_OQ), _mm512_set1_epi32(-1));
      });
      return true;
    }
    default:
      break;
  }
  if (info.code_values != nullptr) return false;
  // Integers: clamp(rne(x / scale) + zp, qmin, qmax), in fp32 as the scalar row.
  const __m512 zp = _mm512_set1_ps(static_cast<float>(zero_point));
  const __m512 lo = _mm512_set1_ps(static_cast<float>(info.qmin)), hi = _mm512_set1_ps(static_cast<float>(info.qmax));
  for_each16(x, n, codes, [&](__m512 v) {
    __m512 r = _mm512_add_ps(_mm512_roundscale_ps(_mm512_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
