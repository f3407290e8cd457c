// panel_gemm on AVX-512: 16 lanes, 6 x 32 micro-tiles (loops in panel_gemm_tiles.h).
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
};

}  // namespace

void panel_gemm_avx512(const PanelGemmProblem& p) { panel_gemm_run<Vector>(p); }

}  // namespace cpu
}  // namespace tensorslim
