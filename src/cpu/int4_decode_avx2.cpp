// INT4 groups decoded straight from the packed bytes on AVX2: the group's 16 values,
// (code - zero point) * scale as the reference computes them, sit in two 8-lane registers;
// vpermps looks a code's low 3 bits up in both and its bit 3 picks one (int4_decode_avx512.cpp
// does it with one 16-lane permute).
#include <immintrin.h>

#include "int4_codes.h"
#include "int4_panel_tiles.h"
#include "transpose8_avx2.h"

namespace tensorslim {
namespace cpu {

void decode_int4_group_avx2(const uint8_t* packed, int64_t n, float scale, int32_t zero_point,
                            bool is_signed, float* out) {
  const __m256i low = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);  // codes 0..7
  const __m256i high = is_signed ? _mm256_setr_epi32(-8, -7, -6, -5, -4, -3, -2, -1)
                                 : _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i zp = _mm256_set1_epi32(zero_point);
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(low, zp)), s);
  const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(high, zp)), s);
  // Lane j of 4 bytes shifted right by 4j: code j in its low 4 bits (low nibble first).
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    int32_t word;
    __builtin_memcpy(&word, packed + i / 2, 4);
    const __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
    const __m256 from_lo = _mm256_permutevar8x32_ps(lo, c), from_hi = _mm256_permutevar8x32_ps(hi, c);
    // Code bit 3 moved to the sign bit selects the upper half of the table.
    _mm256_storeu_ps(out + i, _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28))));
  }
  alignas(32) float values[16];
  _mm256_store_ps(values, lo);
  _mm256_store_ps(values + 8, hi);
  for (; i < n; ++i) out[i] = values[(packed[i / 2] >> (4 * (i & 1))) & 0xF];
}

namespace {

// The vector part of int4_panel_tiles.h: 8 rows per vector.
struct Panel8 {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  static I load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F load_f(const float* p) { return _mm256_loadu_ps(p); }
  static I load_row(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void transpose(I v[8]) { transpose8(v); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static I zero_i() { return _mm256_setzero_si256(); }
  static F zero_f() { return _mm256_setzero_ps(); }
  template <int P>
  static F code(I t, bool uint4, I z) {
    const I top = P == 7 ? t : _mm256_slli_epi32(t, 28 - 4 * P);
    return _mm256_cvtepi32_ps(uint4 ? _mm256_sub_epi32(_mm256_srli_epi32(top, 28), z) : _mm256_srai_epi32(top, 28));
  }
};

}  // namespace

void decode_int4_panel_avx2(const Int4PanelRows& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                            float* packed) {
  decode_int4_panel<Panel8>(w, n0, nr, k0, kc, packed);
}

}  // namespace cpu
}  // namespace tensorslim
