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

void hist_avx512(const float* w, int64_t n, const HistPass& h, int32_t* hist) {
  const int top = h.shift + h.nbits;
  const __m128i top_count = _mm_cvtsi32_si128(top >= 32 ? 0 : top);
  const __m512i prefix = _mm512_set1_epi32(static_cast<int>(top >= 32 ? 0u : h.prefix));
  const __m128i shift = _mm_cvtsi32_si128(h.shift);
  const __m512i bin_mask = _mm512_set1_epi32(static_cast<int>((1u << h.nbits) - 1u));
  alignas(64) int32_t bins[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_castps_si512(score16(w + i, h.p));
    const __m512i high = top >= 32 ? _mm512_setzero_si512() : _mm512_srl_epi32(bits, top_count);
    uint32_t match = _mm512_cmpeq_epi32_mask(high, prefix);
    if (!match) continue;  // most scores leave after the first pass
    _mm512_store_si512(bins, _mm512_and_si512(_mm512_srl_epi32(bits, shift), bin_mask));
    while (match) {
      ++hist[bins[__builtin_ctz(match)]];
      match &= match - 1;
    }
  }
  hist_scalar(w + i, n - i, h, hist);
}

}  // namespace cpu
}  // namespace tensorslim
