// panel_gemm on AVX2 + FMA: 8 lanes, 6 x 16 broadcast micro-tiles and 2 x 4 rows-dot tiles
// (loops in panel_gemm_tiles.h).
#include <immintrin.h>

#include "panel_gemm_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

struct Vector {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  // Rows-dot tiles: 2 x 4 accumulators + 4 weight vectors + 1 activation of 16 registers.
  static constexpr int kDotRows = 2;
  // Past 12 rows the 2-row tiles re-read the weight block too often: at MiniLM's shapes the
  // broadcast kernel was faster from 24 rows (Sapphire Rapids, AVX2 forced), the dot kernel at 9.
  static constexpr int64_t kDotMaxRows = 12;
  static Vec load_first(const float* p, int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
  }
  // out[i] = the sum of a[i]'s lanes, i < 4.
  static void sum4(const Vec* a, float* out) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
};

}  // namespace

void panel_gemm_avx2(const PanelGemmProblem& p) { panel_gemm_run<Vector>(p); }

}  // namespace cpu
}  // namespace tensorslim
