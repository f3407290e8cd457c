// panel_gemm on AVX-512: 16 lanes, 6 x 32 broadcast micro-tiles and 6 x 4 rows-dot tiles
// (loops in panel_gemm_tiles.h).
#include <immintrin.h>

#include "panel_gemm_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

struct Vector {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  // Rows-dot tiles: 6 x 4 accumulators + 4 weight vectors + 1 activation of 32 registers.
  static constexpr int kDotRows = 6, kDotCols = 4;
  static Vec load_first(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  // out[i] = the sum of a[i]'s lanes, i < kDotCols.
  static void sum_lanes(const Vec* a, float* out) {
    __m256 h[4];
    for (int i = 0; i < 4; ++i)
      h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
};

}  // namespace

void panel_gemm_avx512(const PanelGemmProblem& p) { panel_gemm_run<Vector>(p); }

}  // namespace cpu
}  // namespace tensorslim
