// AVX2 score and mask loops (8 floats at a time); the tail runs the scalar reference.
#include <immintrin.h>

#include "spread.h"
#include "tensorslim/prune.h"

namespace tensorslim {
namespace cpu {
namespace {

inline __m256 score8(const float* w, int p) {
  const __m256 v = _mm256_loadu_ps(w);
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);  // clear the sign: |w| exactly
  return p == 1 ? a : _mm256_mul_ps(v, v);
}

}  // namespace

void scores_avx2(const float* w, int64_t n, int p, float* s) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(s + i, score8(w + i, p));
  scores_scalar(w + i, n - i, p, s + i);
}

MaskCounts mask_avx2(const float* w, int64_t n, int p, float t, uint8_t* keep) {
  MaskCounts c;
  const __m256 tv = _mm256_set1_ps(t);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 s = score8(w + i, p);
    const int gt = _mm256_movemask_ps(_mm256_cmp_ps(s, tv, _CMP_GT_OQ));
    const int lt = _mm256_movemask_ps(_mm256_cmp_ps(s, tv, _CMP_LT_OQ));
    const int eq = _mm256_movemask_ps(_mm256_cmp_ps(s, tv, _CMP_EQ_OQ));
    // Spread the 8 keep bits into 8 bytes of 0/1.
    const uint64_t bytes = spread_bits8(static_cast<uint32_t>(gt));
    __builtin_memcpy(keep + i, &bytes, 8);
    c.less += __builtin_popcount(lt);
    c.equal += __builtin_popcount(eq);
  }
  const MaskCounts tail = mask_scalar(w + i, n - i, p, t, keep + i);
  c.less += tail.less;
  c.equal += tail.equal;
  return c;
}

void hist_avx2(const float* w, int64_t n, const HistPass& h, int32_t* hist) {
  const int top = h.shift + h.nbits;
  const __m128i top_count = _mm_cvtsi32_si128(top >= 32 ? 0 : top);
  const __m256i prefix = _mm256_set1_epi32(static_cast<int>(top >= 32 ? 0u : h.prefix));
  const __m128i shift = _mm_cvtsi32_si128(h.shift);
  const __m256i bin_mask = _mm256_set1_epi32(static_cast<int>((1u << h.nbits) - 1u));
  alignas(32) int32_t bins[8];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i bits = _mm256_castps_si256(score8(w + i, h.p));
    const __m256i high = top >= 32 ? _mm256_setzero_si256() : _mm256_srl_epi32(bits, top_count);
    int match = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(high, prefix)));
    if (!match) continue;  // most scores leave after the first pass
    _mm256_store_si256(reinterpret_cast<__m256i*>(bins),
                       _mm256_and_si256(_mm256_srl_epi32(bits, shift), bin_mask));
    while (match) {
      ++hist[bins[__builtin_ctz(match)]];
      match &= match - 1;
    }
  }
  hist_scalar(w + i, n - i, h, hist);
}

}  // namespace cpu
}  // namespace tensorslim
