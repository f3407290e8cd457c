// AVX-512 score and mask loops (16 floats at a time); the tail runs the scalar reference.
#include <immintrin.h>



#include "tensorslim/prune.h"

namespace tensorslim {
namespace cpu {
namespace {

inline __m512 score16(const float* w, int p) {
  const __m512 v = _mm512_loadu_ps(w);
  return p == 1 ? _mm512_abs_ps(v) : _mm512_mul_ps(v, v);  // abs clears the sign bit, as fabs
}

}  // namespace

void scores_avx512(const float* w, int64_t n, int p, float* s) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(s + i, score16(w + i, p));
  scores_scalar(w + i, n - i, p, s + i);
}

MaskCounts mask_avx512(const float* w, int64_t n, int p, float t, uint8_t* keep) {
  MaskCounts c;
  const __m512 tv = _mm512_set1_ps(t);
  const __m128i one = _mm_set1_epi8(1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 s = score16(w + i, p);
    const __mmask16 gt = _mm512_cmp_ps_mask(s, tv, _CMP_GT_OQ);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(keep + i), _mm_maskz_mov_epi8(gt, one));
    c.less += __builtin_popcount(_mm512_cmp_ps_mask(s, tv, _CMP_LT_OQ));
    c.equal += __builtin_popcount(_mm512_cmp_ps_mask(s, tv, _CMP_EQ_OQ));
  }
  const MaskCounts tail = mask_scalar(w + i, n - i, p, t, keep + i);
  c.less += tail.less;
  c.equal += tail.equal;
  return c;
}

}  // namespace cpu
}  // namespace tensorslim
