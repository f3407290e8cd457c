// INT4 rows unpacked to one code per byte: 32 bytes per AVX2 step where the active ISA has it,
// else (and for the tail) through a 256-entry table, one 16-bit load per packed byte. Shared
// by the weight-only panel GEMM and dequantize.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {

// Byte -> its two INT4 codes (low nibble first) as two bytes, sign-extended for the signed format.
struct NibbleTable {
  uint16_t pair[2][256];
  NibbleTable() {
    for (int b = 0; b < 256; ++b)
      for (int s = 0; s < 2; ++s) {
        auto code = [&](int nib) {
          return static_cast<uint8_t>(s ? static_cast<int8_t>(nib << 4) >> 4 : nib);
        };
        pair[s][b] = static_cast<uint16_t>(code(b & 0xF) | code(b >> 4) << 8);
      }
  }
};

#if defined(__x86_64__)
// 32 packed bytes -> 64 codes per step, the table's values (signed: (nibble ^ 8) - 8); returns
// how many bytes it unpacked (whole steps only). ~3x the table's speed (MiniLM's 384 x 1536
// INT4 dequantize: 293 us before, on Sapphire Rapids).
__attribute__((target("avx2"))) inline int64_t unpack_nibbles_avx2(const uint8_t* q, int64_t bytes,
                                                                   bool is_signed, uint8_t* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(is_signed ? 8 : 0);
  int64_t j = 0;
  for (; j + 32 <= bytes; j += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j));
    const __m256i lo = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(v, low), eight), eight);
    const __m256i hi = _mm256_sub_epi8(
        _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), eight), eight);
    // unpack interleaves within 128-bit lanes: a = bytes 0-7 | 16-23, b = 8-15 | 24-31.
    const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j + 32), _mm256_permute2x128_si256(a, b, 0x31));
  }
  return j;
}
#endif

// n values of an INT4 row from packed bytes that start with the group's first value (an even
// index): out[i] = (code_i - zero_point) * scale, the reference's fp32 operations. AVX-512 only
// (int4_decode_avx512.cpp); callers check the active ISA.
void decode_int4_group_avx512(const uint8_t* packed, int64_t n, float scale, int32_t zero_point,
                              bool is_signed, float* out);

// Codes of one K-wide row as bytes: the row itself for 8-bit formats, else unpacked into `codes`.
inline const uint8_t* row_codes(const uint8_t* qrow, int64_t K, int bits, bool is_signed,
                                std::vector<uint8_t>& codes) {
  if (bits != 4) return qrow;
  static const NibbleTable table;
  const uint16_t* pair = table.pair[is_signed ? 1 : 0];
  const int64_t bytes = (K + 1) / 2;
  codes.resize(2 * bytes);
  uint8_t* out = codes.data();  // a plain pointer: the loop must not go back to the vector
  int64_t j = 0;
#if defined(__x86_64__)
  if (active_isa() >= Isa::kAVX2) j = unpack_nibbles_avx2(qrow, bytes, is_signed, out);
#endif
  for (; j < bytes; ++j) {
    out[2 * j] = static_cast<uint8_t>(pair[qrow[j]]);
    out[2 * j + 1] = static_cast<uint8_t>(pair[qrow[j]] >> 8);
  }
  return out;
}

}  // namespace cpu
}  // namespace tensorslim
