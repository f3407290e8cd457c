// AVX2 pieces of quantize_lowbit (the twin of quantize_lowbit_avx512.cpp): group min/max and
// the per-value encoders, 8 values per step, bit-exact with the scalar rows of the format
// table (tests compare every format on every ISA). AVX2 has no mask registers: tails use
// maskload / maskstore and selections a blend on a compare.
#include <immintrin.h>

#include <cstdint>

#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

// All-ones in the first `left` lanes (all 8 when left >= 8).
inline __m256i tail_mask(int64_t left) {
  const int l = left >= 8 ? 8 : static_cast<int>(left);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(l), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256i select(__m256i mask, __m256i yes, __m256i no) {
  return _mm256_blendv_epi8(no, yes, mask);
}

// Small-float code of x (finite): the same steps as the scalar encode_magnitude. The
// exponent field gives floor(log2 |x|) for normals; float subnormals read as -127 and,
// like the scalar frexp result, are clamped to the format's subnormal exponent.
template <int M, int B, int kSignBit>
inline __m256i encode_float(__m256 x, int max_code, float max_value) {
  const __m256i xb = _mm256_castps_si256(x);
  const __m256 a = _mm256_castsi256_ps(_mm256_and_si256(xb, _mm256_set1_epi32(INT32_MAX)));
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 23), _mm256_set1_epi32(127));
  e = _mm256_max_epi32(e, _mm256_set1_epi32(1 - B));
  const __m256 pow2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(_mm256_set1_epi32(M), e), _mm256_set1_epi32(127)), 23));
  const __m256 q = _mm256_round_ps(_mm256_mul_ps(a, pow2), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256i code = _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(B - 1)), M),
                                  _mm256_cvtps_epi32(q));
  const __m256i max = _mm256_set1_epi32(max_code);
  code = _mm256_min_epi32(code, max);
  code = select(_mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(max_value), _CMP_GE_OQ)), max, code);
  const __m256i sign = _mm256_srli_epi32(_mm256_and_si256(xb, _mm256_set1_epi32(INT32_MIN)), 31 - kSignBit);
  return _mm256_or_si256(code, sign);
}

template <class Fn>
inline void for_each8(const float* x, int64_t n, int32_t* codes, Fn&& fn) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), fn(_mm256_loadu_ps(x + i)));
  if (i < n) {  // masked-off lanes load as 0 and are not stored
    const __m256i m = tail_mask(n - i);
    _mm256_maskstore_epi32(codes + i, m, fn(_mm256_maskload_ps(x + i, m)));
  }
}

inline float hmin(__m256 v) {
  __m128 r = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_min_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_min_ss(r, _mm_movehdup_ps(r)));
}

inline float hmax(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}

}  // namespace

bool lowbit_min_max_avx2(const float* x, int64_t n, float* lo, float* hi) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  __m256i bad = _mm256_setzero_si256();
  const __m256i exp_mask = _mm256_set1_epi32(0x7F800000);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_maskload_ps(x + i, tail_mask(n - i));  // 0 beyond n: neutral here
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp_mask), exp_mask));
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  *lo = hmin(vlo);
  *hi = hmax(vhi);
  return _mm256_testz_si256(bad, bad);
}

bool lowbit_encode_avx2(const FormatInfo& info, float scale, int32_t zero_point, float threshold,
                        const float* x, int64_t n, int32_t* codes) {
  const __m256 s = _mm256_set1_ps(scale);
  switch (info.format) {
    case Format::kFP8E4M3:
      for_each8(x, n, codes, [&](__m256 v) { return encode_float<3, 7, 7>(_mm256_div_ps(v, s), 0x7E, 448.0f); });
      return true;
    case Format::kFP8E5M2:
      for_each8(x, n, codes, [&](__m256 v) { return encode_float<2, 15, 7>(_mm256_div_ps(v, s), 0x7B, 57344.0f); });
      return true;
    case Format::kNVFP4:
    case Format::kMXFP4:
      if (!(scale > 0.0f)) {  // as the scalar row: no scale, every code 0
        for_each8(x, n, codes, [](__m256) { return _mm256_setzero_si256(); });
        return true;
      }
      for_each8(x, n, codes, [&](__m256 v) { return encode_float<1, 1, 3>(_mm256_div_ps(v, s), 0x7, 6.0f); });
      return true;
    case Format::kBinary:  // x < 0 -> 0, else 1 (zero -> +1)
      for_each8(x, n, codes, [](__m256 v) {
        const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
        return _mm256_andnot_si256(neg, _mm256_set1_epi32(1));
      });
      return true;
    case Format::kTernary: {
      const __m256 t = _mm256_set1_ps(threshold), mt = _mm256_set1_ps(-threshold);
      for_each8(x, n, codes, [&](__m256 v) {
        const __m256i pos = _mm256_castps_si256(_mm256_cmp_ps(v, t, _CMP_GT_OQ));
        const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(v, mt, _CMP_LT_OQ));
        // pos lanes: -1 & 1 = 1; neg lanes: -1 (all ones); a lane is never both (t >= 0)
        return select(neg, neg, _mm256_and_si256(pos, _mm256_set1_epi32(1)));
      });
      return true;
    }
    default:
      break;
  }
  if (info.code_values != nullptr) return false;
  // Integers: clamp(rne(x / scale) + zp, qmin, qmax), in fp32 as the scalar row.
  const __m256 zp = _mm256_set1_ps(static_cast<float>(zero_point));
  const __m256 lo = _mm256_set1_ps(static_cast<float>(info.qmin)), hi = _mm256_set1_ps(static_cast<float>(info.qmax));
  for_each8(x, n, codes, [&](__m256 v) {
    __m256 r = _mm256_add_ps(_mm256_round_ps(_mm256_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
