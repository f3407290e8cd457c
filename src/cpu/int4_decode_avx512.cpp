// INT4 groups decoded straight from the packed bytes on AVX-512: the group's 16 possible values,
// (code - zero point) * scale as the reference computes them, sit in one register and vpermps
// looks each code up (it reads only an index's low 4 bits, so a byte's high nibble may stay
// above its low one). No unpacked-codes pass, no convert or multiply per value.
#include <immintrin.h>

#include "int4_codes.h"
#include "int4_panel_tiles.h"
#include "transpose16_avx512.h"

namespace tensorslim {
namespace cpu {

void decode_int4_group_avx512(const uint8_t* packed, int64_t n, float scale, int32_t zero_point,
                              bool is_signed, float* out) {
  // Code c in lane c; the signed format's nibbles 8..15 are -8..-1.
  const __m512i nibbles = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i codes = is_signed ? _mm512_sub_epi32(_mm512_xor_si512(nibbles, _mm512_set1_epi32(8)),
                                                     _mm512_set1_epi32(8))
                                  : nibbles;
  const __m512 table = _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(zero_point))), _mm512_set1_ps(scale));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
    // Word j = byte j | byte j << 4: its low byte's low nibble is code 2j, its high byte holds
    // code 2j + 1 (the low nibble first, as packed).
    const __m256i pairs = _mm256_or_si256(w, _mm256_slli_epi16(w, 4));
    _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(pairs)), table));
    _mm512_storeu_ps(out + i + 16,
                     _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(pairs, 1)), table));
  }
  alignas(64) float values[16];
  _mm512_store_ps(values, table);
  for (; i < n; ++i) out[i] = values[(packed[i / 2] >> (4 * (i & 1))) & 0xF];
}

namespace {

// The vector part of int4_panel_tiles.h: 16 rows per vector.
struct Panel16 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16;
  static I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  static F load_f(const float* p) { return _mm512_loadu_ps(p); }
  static I load_row(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static void transpose(I v[16]) { transpose16(v); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static I zero_i() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  template <int P>
  static F code(I t, bool uint4, I z) {
    const I top = P == 7 ? t : _mm512_slli_epi32(t, 28 - 4 * P);
    return _mm512_cvtepi32_ps(uint4 ? _mm512_sub_epi32(_mm512_srli_epi32(top, 28), z) : _mm512_srai_epi32(top, 28));
  }
};

}  // namespace

void decode_int4_panel_avx512(const Int4PanelRows& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                              float* packed) {
  decode_int4_panel<Panel16>(w, n0, nr, k0, kc, packed);
}

}  // namespace cpu
}  // namespace tensorslim
