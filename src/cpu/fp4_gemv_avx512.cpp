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
  static Vec pair(const float* p) {
    const __m128 two = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(two));
  }
  // 16 scale bytes: E4M3 by the FP8 decoder's bit placement (gemm_lowbit_avx512.cpp: the
  // same values as the table) times the tensor scale; E8M0 as e8m0_value.
  template <ScaleFormat kScale>
  static void scales(const uint8_t* b, float tensor_scale, float* out) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    __m512 v;
    if constexpr (kScale == ScaleFormat::kE4M3) {
      const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
      v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(mag, 20)), _mm512_set1_ps(0x1p120f));
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), v,
                               _mm512_set1_ps(__builtin_nanf("")));
      const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
      v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign)),
                        _mm512_set1_ps(tensor_scale));
    } else {
      __m512i bits = _mm512_slli_epi32(c, 23);
      bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(c, _mm512_setzero_si512()),
                                   _mm512_set1_epi32(0x00400000));
      bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(255)),
                                   _mm512_set1_epi32(0x7FC00000));
      v = _mm512_castsi512_ps(bits);
    }
    _mm512_storeu_ps(out, v);
  }
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
