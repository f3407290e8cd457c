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

}  // namespace cpu
}  // namespace tensorslim
