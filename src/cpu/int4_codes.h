// INT4 rows unpacked to one code per byte through a 256-entry table: one 16-bit load per packed
// byte instead of two shifts and a sign extension per value. Shared by the weight-only panel
// GEMM and dequantize.
#pragma once

#include <cstdint>
#include <vector>

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
