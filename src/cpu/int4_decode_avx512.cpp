// INT4 groups decoded straight from the packed bytes on AVX-512: the group's 16 possible values,
// (code - zero point) * scale as the reference computes them, sit in one register and vpermps
// looks each code up (it reads only an index's low 4 bits, so a byte's high nibble may stay
// above its low one). No unpacked-codes pass, no convert or multiply per value.
#include <immintrin.h>

#include <algorithm>

#include "int4_codes.h"
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

// As int4_decode_avx2.cpp's: code P of each lane, times the lane's scale.
template <int P>
inline void store_code(__m512i t, bool uint4, __m512i z, __m512 s, float* out) {
  const __m512i top = P == 7 ? t : _mm512_slli_epi32(t, 28 - 4 * P);
  const __m512i c = uint4 ? _mm512_sub_epi32(_mm512_srli_epi32(top, 28), z) : _mm512_srai_epi32(top, 28);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(c), s));
}

}  // namespace

// The AVX2 version's steps (int4_decode_avx2.cpp) on 16 rows per vector, 64 bytes of each row
// per 16 x 16 transpose.
void decode_int4_panel_avx512(const Int4PanelRows& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                              float* packed) {
  constexpr int NR = 32;
  const int64_t row_bytes = (w.K + 1) / 2, k1 = k0 + kc;
  const int64_t whole = std::min(k1, w.K / 8 * 8);
  const bool uint4 = w.zero_points != nullptr;
  for (int h = 0; h < 2; ++h) {
    float* dst = packed + 16 * h;
    const int64_t live = std::min<int64_t>(16, nr - 16 * h);
    if (live <= 0) {
      for (int64_t k = k0; k < k1; ++k) _mm512_storeu_ps(dst + (k - k0) * NR, _mm512_setzero_ps());
      continue;
    }
    const uint8_t* rows[16];
    alignas(64) int32_t sidx[16];  // the rows' first scale (int32: see decode_int4_panel's callers)
    int64_t zidx[16];
    for (int r = 0; r < 16; ++r) {
      const int64_t n = n0 + 16 * h + std::min<int64_t>(r, live - 1);
      rows[r] = w.q + n * w.ldq;
      sidx[r] = static_cast<int32_t>(n * w.lds);
      zidx[r] = n * w.ldz;
    }
    const __mmask16 in = static_cast<__mmask16>(live >= 16 ? 0xFFFF : (1u << live) - 1);
    const __m512i si = _mm512_load_si512(sidx);
    int64_t group = -1;
    __m512 s = _mm512_setzero_ps();
    __m512i z = _mm512_setzero_si512();
    const auto step = [&](__m512i t, int64_t k, float* out) {
      if (k / w.gsize != group) {  // a step of 8 lies in one group
        group = k / w.gsize;
        s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, si, w.scales + group, 4);
        if (uint4) {  // bytes: a 4-byte gather could read past the last one
          alignas(64) int32_t zv[16];
          for (int r = 0; r < 16; ++r) zv[r] = w.zero_points[zidx[r] + group];
          z = _mm512_load_si512(zv);
        }
      }
      store_code<0>(t, uint4, z, s, out);
      store_code<1>(t, uint4, z, s, out + NR);
      store_code<2>(t, uint4, z, s, out + 2 * NR);
      store_code<3>(t, uint4, z, s, out + 3 * NR);
      store_code<4>(t, uint4, z, s, out + 4 * NR);
      store_code<5>(t, uint4, z, s, out + 5 * NR);
      store_code<6>(t, uint4, z, s, out + 6 * NR);
      store_code<7>(t, uint4, z, s, out + 7 * NR);
    };
    int64_t k = k0;
    for (; k + 128 <= whole; k += 128) {  // 64 bytes of each row, transposed: v[j] = step j
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_loadu_si512(rows[r] + k / 2);
      transpose16(v);
      for (int j = 0; j < 16; ++j) step(v[j], k + 8 * j, dst + (k + 8 * j - k0) * NR);
    }
    for (; k + 8 <= whole; k += 8) {
      alignas(64) int32_t v[16];
      for (int r = 0; r < 16; ++r) __builtin_memcpy(&v[r], rows[r] + k / 2, 4);
      step(_mm512_load_si512(v), k, dst + (k - k0) * NR);
    }
    if (k < k1) {  // K's last values (fewer than 8): bytes past the row read as zeros
      alignas(64) int32_t v[16] = {};
      for (int r = 0; r < 16; ++r) __builtin_memcpy(&v[r], rows[r] + k / 2, std::min<int64_t>(4, row_bytes - k / 2));
      alignas(64) float tail[8 * NR];
      step(_mm512_load_si512(v), k, tail);
      for (int64_t p = 0; p < k1 - k; ++p) __builtin_memcpy(dst + (k - k0 + p) * NR, tail + p * NR, 16 * sizeof(float));
    }
  }
}

}  // namespace cpu
}  // namespace tensorslim
