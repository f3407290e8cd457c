// The format table: one row per number format. Kernels, bindings and tests
// read what they need from here; adding a format is adding a row.
#pragma once

#include <cstdint>

namespace tensorslim {

enum class Format : int32_t {
  kInt8 = 0,   // signed 8-bit, symmetric (no zero point)
  kUInt8 = 1,  // unsigned 8-bit with a zero point (asymmetric)
  kInt4 = 2,   // signed 4-bit, symmetric, two per byte, low nibble first
  kUInt4 = 3,  // unsigned 4-bit with a zero point, two per byte, low nibble first
};

enum class ScaleFormat : int32_t { kFloat32 = 0 };

// Reference encode/decode of one value: the specification every kernel matches.
using EncodeFn = int32_t (*)(float x, float scale, int32_t zero_point);
using DecodeFn = float (*)(int32_t code, float scale, int32_t zero_point);

struct FormatInfo {
  Format format;
  const char* name;
  int bits;               // bits per stored value
  bool has_zero_point;    // asymmetric formats carry one uint8 zero point per group
  int32_t qmin, qmax;     // code range
  int32_t scale_divisor;  // scale = range / scale_divisor (amax/qmax or (max-min)/(qmax-qmin))
  int block_size;         // 0: any group size the caller picks (32..256, a row, the tensor)
  ScaleFormat scale_format;
  EncodeFn encode;
  DecodeFn decode;
};

constexpr int kNumFormats = 4;
const FormatInfo& format_info(Format f);
const FormatInfo* format_table();           // kNumFormats rows
const FormatInfo* find_format(const char* name);  // nullptr when unknown

// Bytes one group of `group` values takes: packed codes, one scale, a zero point if any.
int64_t bytes_per_block(const FormatInfo& info, int64_t group);
// Bytes of `cols` codes packed in a row (INT4 rounds up to whole bytes).
inline int64_t packed_row_bytes(const FormatInfo& info, int64_t cols) {
  return (cols * info.bits + 7) / 8;
}

}  // namespace tensorslim
