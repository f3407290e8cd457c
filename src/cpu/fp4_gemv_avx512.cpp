// AVX-512 E2M1 GEMV (fp4_gemv.h): 16 bytes of codes per step, 32 values, 16 lanes.
#include <immintrin.h>

#include "fp4_gemv_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

struct Fp4Vec512 {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  // 32 zmm registers: up to 4 activation rows x 2 weight rows of sums and scaled sums, or 2 x 4.
  static constexpr int kMaxRows = 4;
  static constexpr int weight_rows(int MB) { return MB <= 2 ? 4 : 2; }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float v) { return _mm512_set1_ps(v); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec halves(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  // vpermps reads an index's low 4 bits: the 16 code values, sign included, are the table.
  using Table = __m512;
  static Table table(const float* v) { return _mm512_loadu_ps(v); }
  static void decode(const uint8_t* p, Table t, Vec& lo, Vec& hi) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(c, t);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t);
  }
};

}  // namespace

void linear_fp4_avx512(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo,
                       int64_t n0, int64_t n1) {
  fp4_dispatch<Fp4Vec512>(a, w, bias, out, ldo, n0, n1);
}

}  // namespace cpu
}  // namespace tensorslim
