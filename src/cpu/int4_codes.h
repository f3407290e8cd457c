// INT4 rows on the CPU, shared by the weight-only panel GEMM and dequantize: groups decoded
// straight to fp32 by the active ISA's kernel (a 16-value table looked up by permutes), and
// the scalar path, which unpacks a row to one code per byte through a 256-entry table.
#pragma once

#include <cstdint>
#include <vector>

#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {

// n values of an INT4 row from packed bytes that start with the group's first value (an even
// index): out[i] = (code_i - zero_point) * scale, the reference's fp32 operations.
using Int4GroupDecoder = void (*)(const uint8_t* packed, int64_t n, float scale, int32_t zero_point,
                                  bool is_signed, float* out);
void decode_int4_group_avx512(const uint8_t* packed, int64_t n, float scale, int32_t zero_point,
                              bool is_signed, float* out);
void decode_int4_group_avx2(const uint8_t* packed, int64_t n, float scale, int32_t zero_point,
                            bool is_signed, float* out);

// INT4 weight rows as the weight-only panel GEMM multiplies them: rows [n0, n0 + nr), columns
// [k0, k0 + kc) (k0 a multiple of 8, groups of a multiple of 8 values or one per row), each
// value (code - zero point) * scale as the reference computes it, written transposed straight
// into the panel's layout packed[k][j] for row n0 + j (2 * the ISA's lanes columns; those past
// nr hold zeros times codes of row n0: finite, never stored). This skips the row-major copy
// that pack_panel transposes.
struct Int4PanelRows {
  const uint8_t* q;  // codes, two per byte, low nibble first; rows ldq bytes apart
  int64_t ldq;
  const float* scales;  // [N, lds]
  int64_t lds;
  const uint8_t* zero_points;  // [N, ldz] (uint4), or nullptr (int4, zero point 0)
  int64_t ldz;
  int64_t gsize, K;
};
void decode_int4_panel_avx2(const Int4PanelRows& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                            float* packed);  // 16 columns
void decode_int4_panel_avx512(const Int4PanelRows& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                              float* packed);  // 32 columns

// The active ISA's group decoder; nullptr on the scalar path (then row_codes + decode_s8/u8).
inline Int4GroupDecoder int4_group_decoder() {
#if defined(TENSORSLIM_HAVE_AVX512)
  if (active_isa() == Isa::kAVX512) return decode_int4_group_avx512;
#endif
#if defined(TENSORSLIM_HAVE_AVX2)
  if (active_isa() == Isa::kAVX2) return decode_int4_group_avx2;
#endif
  return nullptr;
}

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

// Codes of one K-wide row as bytes: the row itself for 8-bit formats, else unpacked into `codes`.
inline const uint8_t* row_codes(const uint8_t* qrow, int64_t K, int bits, bool is_signed,
                                std::vector<uint8_t>& codes) {
  if (bits != 4) return qrow;
  static const NibbleTable table;
  const uint16_t* pair = table.pair[is_signed ? 1 : 0];
  const int64_t bytes = (K + 1) / 2;
  codes.resize(2 * bytes);
  uint8_t* out = codes.data();  // a plain pointer: the loop must not go back to the vector
  for (int64_t j = 0; j < bytes; ++j) {
    out[2 * j] = static_cast<uint8_t>(pair[qrow[j]]);
    out[2 * j + 1] = static_cast<uint8_t>(pair[qrow[j]] >> 8);
  }
  return out;
}

}  // namespace cpu
}  // namespace tensorslim
