// AVX-512 kernels of GPTQ's column loop (twin of gptq_avx2.cpp, one vector width up). The
// lazy batch update keeps a 4-row x 24-column tile of c in registers (12 accumulators) while
// t runs over the block's columns; the 24-column strip of u (k x 192 bytes) stays in L1
// across row tiles.
// No Eigen here: this file has its own instruction-set flags.
#include <immintrin.h>

#include "gptq_kernels.h"
#include "gptq_strips.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kVec = 8;        // doubles per vector

struct Kernel {  // what gptq_strips.h needs
  static constexpr int kCols = 3 * kVec;  // columns per tile

  template <int R>
  static void tile(double* c, int64_t ldc, const double* e, int64_t lde, const double* u, int64_t ldu, int64_t k) {
    __m512d acc[R][3];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 3; ++v) acc[r][v] = _mm512_loadu_pd(c + r * ldc + v * kVec);
    for (int64_t t = 0; t < k; ++t) {
      const double* ut = u + t * ldu;
      const __m512d u0 = _mm512_loadu_pd(ut), u1 = _mm512_loadu_pd(ut + kVec), u2 = _mm512_loadu_pd(ut + 2 * kVec);
      for (int r = 0; r < R; ++r) {
        const __m512d a = _mm512_set1_pd(e[r * lde + t]);
        acc[r][0] = _mm512_fnmadd_pd(a, u0, acc[r][0]);
        acc[r][1] = _mm512_fnmadd_pd(a, u1, acc[r][1]);
        acc[r][2] = _mm512_fnmadd_pd(a, u2, acc[r][2]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 3; ++v) _mm512_storeu_pd(c + r * ldc + v * kVec, acc[r][v]);
  }

  static void axpy(double* y, const double* x, double a, int64_t n) { gptq_axpy_avx512(y, x, a, n); }
};

}  // namespace

void gptq_update_avx512(double* c, int64_t ldc, const double* e, int64_t lde, const double* u,
                        int64_t ldu, int64_t m, int64_t n, int64_t k) {
  gptq_update_in_strips<Kernel>(c, ldc, e, lde, u, ldu, m, n, k);
}

void gptq_axpy_avx512(double* y, const double* x, double a, int64_t n) {
  const __m512d va = _mm512_set1_pd(a);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec)
    _mm512_storeu_pd(y + j, _mm512_fnmadd_pd(va, _mm512_loadu_pd(x + j), _mm512_loadu_pd(y + j)));
  for (; j < n; ++j) y[j] -= a * x[j];
}

}  // namespace cpu
}  // namespace tensorslim
