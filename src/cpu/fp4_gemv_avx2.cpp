// AVX2 E2M1 GEMV (fp4_gemv.h): 8 bytes of codes per step, 16 values, 8 lanes.
#include <immintrin.h>

#include <cstring>

#include "fp4_gemv_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

struct Fp4Vec256 {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  // 16 ymm registers: 2 activation rows x 2 weight rows of sums and scaled sums, or 1 x 4.
  static constexpr int kMaxRows = 2;
  static constexpr int weight_rows(int MB) { return MB == 1 ? 4 : 2; }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  // (Unused by the formats on 8 lanes, whose groups fill a 16-value step; kept for the loop.)
  static Vec pair(const float* p) { return _mm256_setr_ps(p[0], p[0], p[0], p[0], p[1], p[1], p[1], p[1]); }
  // 8 scale bytes: E4M3 by the FP8 decoder's bit placement (gemm_lowbit_avx2.cpp: the same
  // values as the table) times the tensor scale; E8M0 as e8m0_value.
  template <ScaleFormat kScale>
  static void scales(const uint8_t* b, float tensor_scale, float* out) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
    __m256 v;
    if constexpr (kScale == ScaleFormat::kE4M3) {
      const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
      v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(mag, 20)), _mm256_set1_ps(0x1p120f));
      v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")),
                           _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F))));
      const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
      v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign)),
                        _mm256_set1_ps(tensor_scale));
    } else {
      __m256i bits = _mm256_slli_epi32(c, 23);
      bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00400000), _mm256_cmpeq_epi32(c, _mm256_setzero_si256()));
      bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC00000), _mm256_cmpeq_epi32(c, _mm256_set1_epi32(255)));
      v = _mm256_castsi256_ps(bits);
    }
    _mm256_storeu_ps(out, v);
  }
  static float sum(Vec v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
  }
  // The 8 magnitudes of E2M1 (codes 0..7), each xor'ed with its index shifted to bits 28..30:
  // a lane holding code c (and any bits above it) permutes to magnitude[c & 7], and xor'ing
  // c << 28 cancels those bits and moves the sign (code bit 3) to bit 31; bits above the
  // code leave the lane in the shift. The table is data to the permute, never arithmetic.
  using Table = __m256i;
  static Table table(const float* v) {
    alignas(32) uint32_t t[8];
    for (uint32_t c = 0; c < 8; ++c) {
      std::memcpy(&t[c], &v[c], 4);
      t[c] ^= c << 28;
    }
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
  }
  static Vec value(Table t, __m256i c) {
    const __m256 m = _mm256_permutevar8x32_ps(_mm256_castsi256_ps(t), c);
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(m), _mm256_slli_epi32(c, 28)));
  }
  static void decode(const uint8_t* p, Table t, Vec& lo, Vec& hi) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = value(t, c);
    hi = value(t, _mm256_srli_epi32(c, 4));
  }
};

}  // namespace

void linear_fp4_avx2(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo,
                     int64_t n0, int64_t n1) {
  fp4_dispatch<Fp4Vec256>(a, w, bias, out, ldo, n0, n1);
}

}  // namespace cpu
}  // namespace tensorslim
