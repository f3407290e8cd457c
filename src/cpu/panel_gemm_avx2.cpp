// panel_gemm on AVX2 + FMA: 8 lanes, 6 x 16 micro-tiles (loops in panel_gemm_tiles.h).
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
};

}  // namespace

void panel_gemm_avx2(const PanelGemmProblem& p) { panel_gemm_run<Vector>(p); }

}  // namespace cpu
}  // namespace tensorslim
