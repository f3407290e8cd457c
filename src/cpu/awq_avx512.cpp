// AVX-512 kernels of the AWQ searches (twin of awq_avx2.cpp, one vector width up). Quadratic
// forms: Y = D G computed 6 rows x 32 columns at a time in registers (a 32-column strip of G,
// K x 128 bytes, stays in L2 across row tiles), each strip folded into sum_j Y[r, j] d[r, j]
// at once, so Y is never stored. With a folded upper triangle, strip j only reads G's rows
// i < j + 32.
// No Eigen here: this file has its own instruction-set flags.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "awq_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int64_t kStrip = 32;  // columns per strip: two vectors

// Rows [0, iend) of the strip's columns [j, j + 32), for R rows of d.
template <int R>
void strip(const float* d, int64_t ldd, int64_t iend, const float* g, int64_t ldg, int64_t j, double* out) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < iend; ++i) {
    const float* gi = g + i * ldg + j;
    const __m512 g0 = _mm512_loadu_ps(gi), g1 = _mm512_loadu_ps(gi + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(d[r * ldd + i]);
      acc[r][0] = _mm512_fmadd_ps(b, g0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, g1, acc[r][1]);
    }
  }
  alignas(64) float prod[kStrip];
  for (int r = 0; r < R; ++r) {
    const float* dr = d + r * ldd + j;
    _mm512_store_ps(prod, _mm512_mul_ps(acc[r][0], _mm512_loadu_ps(dr)));
    _mm512_store_ps(prod + 16, _mm512_mul_ps(acc[r][1], _mm512_loadu_ps(dr + 16)));
    double s = 0.0;
    for (int k = 0; k < kStrip; ++k) s += prod[k];
    out[r] += s;
  }
}

}  // namespace

void quad_forms_avx512(const float* d, int64_t nr, int64_t K, int64_t ldd, const float* g,
                       int64_t ldg, double* out, bool upper) {
  for (int64_t r = 0; r < nr; ++r) out[r] = 0.0;
  int64_t j = 0;
  for (; j + kStrip <= K; j += kStrip) {
    const int64_t iend = upper ? j + kStrip : K;
    int64_t r = 0;
    for (; r + 6 <= nr; r += 6) strip<6>(d + r * ldd, ldd, iend, g, ldg, j, out + r);
    for (; r < nr; ++r) strip<1>(d + r * ldd, ldd, iend, g, ldg, j, out + r);
  }
  for (; j < K; ++j)  // a last partial strip, scalar
    for (int64_t r = 0; r < nr; ++r) {
      float y = 0.0f;
      for (int64_t i = 0; i < (upper ? j + 1 : K); ++i) y += d[r * ldd + i] * g[i * ldg + j];
      out[r] += static_cast<double>(y) * d[r * ldd + j];
    }
}

void fake_quant_avx512(const float* v, float* out, int64_t n, int32_t qmin, int32_t qmax,
                       int32_t divisor, bool symmetric, float ratio) {
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    vlo = _mm512_min_ps(vlo, x);
    vhi = _mm512_max_ps(vhi, x);
  }
  alignas(64) float lo16[16], hi16[16];
  _mm512_store_ps(lo16, vlo);
  _mm512_store_ps(hi16, vhi);
  float lo = 0.0f, hi = 0.0f;
  for (int k = 0; k < 16; ++k) {
    lo = std::min(lo, lo16[k]);
    hi = std::max(hi, hi16[k]);
  }
  for (int64_t k = i; k < n; ++k) {
    lo = std::min(lo, v[k]);
    hi = std::max(hi, v[k]);
  }
  lo *= ratio;
  hi *= ratio;
  const float span = symmetric ? std::max(-lo, hi) : hi - lo;
  float scale = span / static_cast<float>(divisor);
  if (!(scale > 0.0f)) scale = 1.0f;
  const float fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  const float zp = symmetric ? 0.0f : std::min(std::max(std::nearbyint(-lo / scale), fmin), fmax);
  const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zp);
  const __m512 vmin = _mm512_set1_ps(fmin), vmax = _mm512_set1_ps(fmax);
  for (i = 0; i + 16 <= n; i += 16) {
    __m512 c = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(v + i), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    c = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(c, vz), vmin), vmax);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_sub_ps(c, vz), vs));
  }
  for (; i < n; ++i) {
    const float c = std::min(std::max(std::nearbyint(v[i] / scale) + zp, fmin), fmax);
    out[i] = (c - zp) * scale;
  }
}

}  // namespace cpu
}  // namespace tensorslim
