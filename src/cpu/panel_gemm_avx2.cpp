// panel_gemm on AVX2 + FMA: 8 lanes, 6 x 16 broadcast micro-tiles and 4 x 3 rows-dot tiles
// (loops in panel_gemm_tiles.h).
#include <immintrin.h>

#include "panel_gemm_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

struct Vector {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  // Broadcast micro-tiles of 6 rows: 12 accumulators + 2 weight vectors + 1 broadcast fit the
  // 16 registers.
  static constexpr int kPanelRows = 6;
  static int panel_rows() { return kPanelRows; }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  // Rows-dot tiles: 4 x 3 accumulators + 3 weight vectors + 1 activation: all 16 registers.
  static constexpr int kDotRows = 4, kDotCols = 3;
  static Vec load_first(const float* p, int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
  }
  // out[i] = the sum of a[i]'s lanes, i < kDotCols.
  static void sum_lanes(const Vec* a, float* out) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[2]));
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    alignas(16) float four[4];
    _mm_store_ps(four, s);
    for (int i = 0; i < kDotCols; ++i) out[i] = four[i];
  }
};

}  // namespace

void panel_gemm_avx2(const PanelGemmProblem& p) { panel_gemm_run<Vector>(p); }

}  // namespace cpu
}  // namespace tensorslim
