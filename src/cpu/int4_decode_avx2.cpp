// INT4 groups decoded straight from the packed bytes on AVX2: the group's 16 values,
// (code - zero point) * scale as the reference computes them, sit in two 8-lane registers;
// vpermps looks a code's low 3 bits up in both and its bit 3 picks one (int4_decode_avx512.cpp
// does it with one 16-lane permute).
#include <immintrin.h>

#include <algorithm>

#include "int4_codes.h"
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

// 4 bytes (8 codes) of a row from byte b; at the row's end only the bytes it has (zeros after).
inline int32_t row_word(const uint8_t* row, int64_t b, int64_t row_bytes) {
  int32_t v = 0;
  __builtin_memcpy(&v, row + b, row_bytes - b >= 4 ? 4 : row_bytes - b);
  return v;
}

// Code P of each lane (bits 4P .. 4P + 3) shifted to the top, then back down with the sign
// (int4) or without it (uint4, then minus the zero point), times the lane's scale.
template <int P>
inline void store_code(__m256i t, bool uint4, __m256i z, __m256 s, float* out) {
  const __m256i top = P == 7 ? t : _mm256_slli_epi32(t, 28 - 4 * P);
  const __m256i c = uint4 ? _mm256_sub_epi32(_mm256_srli_epi32(top, 28), z) : _mm256_srai_epi32(top, 28);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(c), s));
}

}  // namespace

void decode_int4_panel_avx2(const Int4PanelRows& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                            float* packed) {
  constexpr int NR = 16;
  const int64_t row_bytes = (w.K + 1) / 2, k1 = k0 + kc;
  const int64_t whole = std::min(k1, w.K / 8 * 8);  // steps of 8 codes that lie inside the row
  const bool uint4 = w.zero_points != nullptr;
  for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7 of the panel, one per lane
    float* dst = packed + 8 * h;
    const int64_t live = std::min<int64_t>(8, nr - 8 * h);
    if (live <= 0) {
      for (int64_t k = k0; k < k1; ++k) _mm256_storeu_ps(dst + (k - k0) * NR, _mm256_setzero_ps());
      continue;
    }
    const uint8_t* rows[8];
    int64_t row_n[8];
    for (int r = 0; r < 8; ++r) {
      row_n[r] = n0 + 8 * h + std::min<int64_t>(r, live - 1);  // past nr: the last row, scale 0
      rows[r] = w.q + row_n[r] * w.ldq;
    }
    int64_t group = -1;
    __m256 s = _mm256_setzero_ps();
    __m256i z = _mm256_setzero_si256();
    // The lanes' scale and zero point for the group of value k (a step of 8 lies in one group).
    const auto group_of = [&](int64_t k) {
      if (k / w.gsize == group) return;
      group = k / w.gsize;
      float sv[8];
      int32_t zv[8];
      for (int r = 0; r < 8; ++r) {
        sv[r] = r < live ? w.scales[row_n[r] * w.lds + group] : 0.0f;
        zv[r] = uint4 ? w.zero_points[row_n[r] * w.ldz + group] : 0;
      }
      s = _mm256_setr_ps(sv[0], sv[1], sv[2], sv[3], sv[4], sv[5], sv[6], sv[7]);
      z = _mm256_setr_epi32(zv[0], zv[1], zv[2], zv[3], zv[4], zv[5], zv[6], zv[7]);
    };
    const auto step = [&](__m256i t, int64_t k, float* out) {  // values k .. k + 7 of the 8 rows
      group_of(k);
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
    for (; k + 64 <= whole; k += 64) {  // 32 bytes of each row, transposed: v[j] = step j
      __m256i v[8];
      for (int r = 0; r < 8; ++r) v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + k / 2));
      transpose8(v);
      for (int j = 0; j < 8; ++j) step(v[j], k + 8 * j, dst + (k + 8 * j - k0) * NR);
    }
    for (; k + 8 <= whole; k += 8) {
      int32_t v[8];
      for (int r = 0; r < 8; ++r) __builtin_memcpy(&v[r], rows[r] + k / 2, 4);
      step(_mm256_setr_epi32(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]), k, dst + (k - k0) * NR);
    }
    if (k < k1) {  // K's last values (fewer than 8): bytes past the row read as zeros
      int32_t v[8];
      for (int r = 0; r < 8; ++r) v[r] = row_word(rows[r], k / 2, row_bytes);
      alignas(32) float tail[8 * NR];
      step(_mm256_setr_epi32(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]), k, tail);
      for (int64_t p = 0; p < k1 - k; ++p) __builtin_memcpy(dst + (k - k0 + p) * NR, tail + p * NR, 8 * sizeof(float));
    }
  }
}

}  // namespace cpu
}  // namespace tensorslim
