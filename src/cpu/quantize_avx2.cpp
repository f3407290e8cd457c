// AVX2 quantize kernels (compiled with -mavx2 -mfma). Vector body plus the scalar
// reference for the tail; same operations as the reference, so bit-exact.
#include <immintrin.h>

#include <cmath>

#include "quant_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

bool min_max(const float* x, int64_t n, float* lo, float* hi) {
  __m256 vlo = _mm256_set1_ps(INFINITY), vhi = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(INFINITY), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_andnot_ps(sign, v), inf, _CMP_NLT_UQ));
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  float l = hmin(vlo), h = hmax(vhi);
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; i < n; ++i) {
    if (!std::isfinite(x[i])) finite = false;
    l = std::fmin(l, x[i]);
    h = std::fmax(h, x[i]);
  }
  *lo = l;
  *hi = h;
  return finite;
}

void encode(const float* x, int64_t n, float scale, float zp, float qmin, float qmax,
            uint8_t* codes) {
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zp);
  const __m256 vmin = _mm256_set1_ps(qmin), vmax = _mm256_set1_ps(qmax);
  // Picks byte 0 of each 32-bit lane, then gathers the two 128-bit halves.
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i join = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vz), vmin), vmax);
    __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_cvttps_epi32(r), pick), join);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm256_castsi256_si128(b));
  }
  for (; i < n; ++i) {
    float r = std::nearbyint(x[i] / scale) + zp;
    r = std::fmin(std::fmax(r, qmin), qmax);
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(r));
  }
}

template <bool kSigned, typename T>
void decode(const T* c, int64_t n, float scale, int32_t zp, float* out) {
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i vz = _mm256_set1_epi32(zp);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i));
    __m256i w = kSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(w, vz)), vs));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(c[i] - zp) * scale;
}

void decode_s8(const int8_t* c, int64_t n, float s, int32_t z, float* o) { decode<true>(c, n, s, z, o); }
void decode_u8(const uint8_t* c, int64_t n, float s, int32_t z, float* o) { decode<false>(c, n, s, z, o); }

const QuantKernels kAvx2 = {min_max, encode, decode_s8, decode_u8};

}  // namespace

const QuantKernels& avx2_quant_kernels() { return kAvx2; }

}  // namespace cpu
}  // namespace tensorslim
