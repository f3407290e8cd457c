#include "tensorslim/formats.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "tensorslim/status.h"

namespace tensorslim {
namespace {

int32_t clamp_code(float v, int32_t lo, int32_t hi) {
  v = std::fmin(std::fmax(v, static_cast<float>(lo)), static_cast<float>(hi));
  return static_cast<int32_t>(v);
}

// std::nearbyint rounds half to even in the default rounding mode.
template <int32_t QMIN, int32_t QMAX>
int32_t encode_int(float x, float scale, int32_t zero_point) {
  float r = std::nearbyint(x / scale) + static_cast<float>(zero_point);
  return clamp_code(r, QMIN, QMAX);
}

float decode_int(int32_t code, float scale, int32_t zero_point) {
  return static_cast<float>(code - zero_point) * scale;
}

// ---- small IEEE-like floats: E exponent bits, M mantissa bits, bias B

// Magnitude code of a >= 0 (finite), rounded to nearest even, saturated at max_code.
// Scaling a by a power of two is exact, so nearbyint sees the exact quotient.
uint32_t encode_magnitude(float a, int M, int B, uint32_t max_code, float max_value) {
  if (!(a < max_value)) return max_code;
  if (a == 0.0f) return 0;
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1): floor(log2 a) = e - 1
  int E = e - 1;
  if (E < 1 - B) E = 1 - B;  // subnormal range: the quantum stays 2^(1-B-M)
  const float q = std::nearbyint(std::ldexp(a, M - E));  // mantissa incl. the implicit bit
  // Normal: ((E+B) << M) | (q - 2^M) == ((E+B-1) << M) + q; a carry (q = 2^(M+1)) or a
  // subnormal rounding up to 2^M lands on the next exponent's pattern by itself.
  const uint32_t code = (static_cast<uint32_t>(E + B - 1) << M) + static_cast<uint32_t>(q);
  return code > max_code ? max_code : code;
}

float decode_magnitude(uint32_t mag, int M, int B) {
  const uint32_t exp = mag >> M, man = mag & ((1u << M) - 1);
  if (exp == 0) return std::ldexp(static_cast<float>(man), 1 - B - M);
  return std::ldexp(static_cast<float>((1u << M) + man), static_cast<int>(exp) - B - M);
}

struct CodeTables {
  float e4m3[256], e5m2[256], e2m1[16], binary[2], ternary[4];
  CodeTables() {
    for (int c = 0; c < 256; ++c) e4m3[c] = e4m3_decode(static_cast<uint8_t>(c));
    for (int c = 0; c < 256; ++c) e5m2[c] = e5m2_decode(static_cast<uint8_t>(c));
    for (int c = 0; c < 16; ++c) e2m1[c] = e2m1_decode(static_cast<uint8_t>(c));
    binary[0] = -1.0f, binary[1] = 1.0f;
    // 0b10 is never written; readers treat it as 0.
    ternary[0] = 0.0f, ternary[1] = 1.0f, ternary[2] = 0.0f, ternary[3] = -1.0f;
  }
};
const CodeTables kCodes;

int32_t encode_e4m3_row(float x, float scale, int32_t) { return e4m3_encode(x / scale); }
float decode_e4m3_row(int32_t c, float scale, int32_t) { return kCodes.e4m3[c & 0xFF] * scale; }
int32_t encode_e5m2_row(float x, float scale, int32_t) { return e5m2_encode(x / scale); }
float decode_e5m2_row(int32_t c, float scale, int32_t) { return kCodes.e5m2[c & 0xFF] * scale; }
// NVFP4 / MXFP4 elements: scale is the block's decoded scale (times the tensor scale).
int32_t encode_e2m1_row(float x, float scale, int32_t) {
  return scale > 0.0f ? e2m1_encode(x / scale) : 0;
}
float decode_e2m1_row(int32_t c, float scale, int32_t) { return kCodes.e2m1[c & 0xF] * scale; }
// Binary: zero (either sign) maps to +1.
int32_t encode_binary(float x, float, int32_t) { return x < 0.0f ? 0 : 1; }
float decode_binary(int32_t c, float scale, int32_t) { return c ? scale : -scale; }
// Ternary: the second argument is the threshold t; |x| > t keeps the sign.
int32_t encode_ternary(float x, float t, int32_t) { return x > t ? 1 : (x < -t ? -1 : 0); }
float decode_ternary(int32_t c, float scale, int32_t) { return static_cast<float>(c) * scale; }

constexpr ScaleFormat kF32 = ScaleFormat::kFloat32;
#define TS_INT_ROW(id, name, bits, lo, hi)                                                   \
  {id, name, bits, false, lo, hi, hi, 0, kF32, encode_int<lo, hi>, decode_int, false, 0, 0, \
   static_cast<float>(hi), false, nullptr}
#define TS_UINT_ROW(id, name, bits, hi)                                                      \
  {id, name, bits, true, 0, hi, hi, 0, kF32, encode_int<0, hi>, decode_int, false, 0, 0,    \
   static_cast<float>(hi), false, nullptr}

const FormatInfo kTable[kNumFormatRows] = {
    TS_INT_ROW(Format::kInt8, "int8", 8, -128, 127),
    TS_UINT_ROW(Format::kUInt8, "uint8", 8, 255),
    TS_INT_ROW(Format::kInt4, "int4", 4, -8, 7),
    TS_UINT_ROW(Format::kUInt4, "uint4", 4, 15),
    {Format::kFP8E4M3, "fp8_e4m3", 8, false, 0, 255, 448, 0, kF32, encode_e4m3_row,
     decode_e4m3_row, true, 4, 3, 448.0f, false, kCodes.e4m3},
    {Format::kFP8E5M2, "fp8_e5m2", 8, false, 0, 255, 57344, 0, kF32, encode_e5m2_row,
     decode_e5m2_row, true, 5, 2, 57344.0f, false, kCodes.e5m2},
    {Format::kNVFP4, "nvfp4", 4, false, 0, 15, 6, 16, ScaleFormat::kE4M3, encode_e2m1_row,
     decode_e2m1_row, true, 2, 1, 6.0f, true, kCodes.e2m1},
    {Format::kMXFP4, "mxfp4", 4, false, 0, 15, 0, 32, ScaleFormat::kE8M0, encode_e2m1_row,
     decode_e2m1_row, true, 2, 1, 6.0f, false, kCodes.e2m1},
    TS_INT_ROW(Format::kInt2, "int2", 2, -2, 1),
    TS_UINT_ROW(Format::kUInt2, "uint2", 2, 3),
    TS_INT_ROW(Format::kInt3, "int3", 3, -4, 3),
    TS_UINT_ROW(Format::kUInt3, "uint3", 3, 7),
    TS_INT_ROW(Format::kInt5, "int5", 5, -16, 15),
    TS_UINT_ROW(Format::kUInt5, "uint5", 5, 31),
    TS_INT_ROW(Format::kInt6, "int6", 6, -32, 31),
    TS_UINT_ROW(Format::kUInt6, "uint6", 6, 63),
    TS_INT_ROW(Format::kInt7, "int7", 7, -64, 63),
    TS_UINT_ROW(Format::kUInt7, "uint7", 7, 127),
    {Format::kBinary, "binary", 1, false, 0, 1, 0, 0, kF32, encode_binary, decode_binary, false,
     0, 0, 1.0f, false, kCodes.binary},
    {Format::kTernary, "ternary", 2, false, -1, 1, 0, 0, kF32, encode_ternary, decode_ternary,
     false, 0, 0, 1.0f, false, kCodes.ternary},
};
#undef TS_INT_ROW
#undef TS_UINT_ROW

}  // namespace

uint8_t e4m3_encode(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  if (std::isnan(x)) return sign | 0x7F;
  return sign | static_cast<uint8_t>(encode_magnitude(std::fabs(x), 3, 7, 0x7E, 448.0f));
}

float e4m3_decode(uint8_t code) {
  const float sign = (code & 0x80) ? -1.0f : 1.0f;
  if ((code & 0x7F) == 0x7F) return sign * std::numeric_limits<float>::quiet_NaN();
  return sign * decode_magnitude(code & 0x7F, 3, 7);
}

uint8_t e5m2_encode(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  if (std::isnan(x)) return sign | 0x7E;
  if (std::isinf(x)) return sign | 0x7C;
  return sign | static_cast<uint8_t>(encode_magnitude(std::fabs(x), 2, 15, 0x7B, 57344.0f));
}

float e5m2_decode(uint8_t code) {
  const float sign = (code & 0x80) ? -1.0f : 1.0f;
  const uint8_t mag = code & 0x7F;
  if (mag == 0x7C) return sign * std::numeric_limits<float>::infinity();
  if (mag > 0x7C) return sign * std::numeric_limits<float>::quiet_NaN();
  return sign * decode_magnitude(mag, 2, 15);
}

uint8_t e2m1_encode(float x) {
  if (std::isnan(x)) return 0;
  const uint8_t sign = std::signbit(x) ? 0x8 : 0;
  return sign | static_cast<uint8_t>(encode_magnitude(std::fabs(x), 1, 1, 0x7, 6.0f));
}

float e2m1_decode(uint8_t code) {
  const float mag = decode_magnitude(code & 0x7, 1, 1);
  return (code & 0x8) ? -mag : mag;
}

uint8_t e8m0_from_exponent(int exponent) {
  if (exponent < -127) exponent = -127;
  if (exponent > 127) exponent = 127;
  return static_cast<uint8_t>(exponent + 127);
}

float e8m0_decode(uint8_t code) {
  if (code == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(code) - 127);
}

const FormatInfo* format_table() { return kTable; }

const FormatInfo* find_format_id(int32_t id) {
  for (const auto& row : kTable)
    if (static_cast<int32_t>(row.format) == id) return &row;
  return nullptr;
}

const FormatInfo& format_info(Format f) {
  const FormatInfo* row = find_format_id(static_cast<int32_t>(f));
  if (!row) throw ValueError("unknown format id " + std::to_string(static_cast<int>(f)));
  return *row;
}

const FormatInfo* find_format(const char* name) {
  for (const auto& row : kTable)
    if (std::strcmp(row.name, name) == 0) return &row;
  return nullptr;
}

int64_t bytes_per_block(const FormatInfo& info, int64_t group) {
  const int scale_bytes = info.scale_format == ScaleFormat::kFloat32 ? 4 : 1;
  return (group * info.bits + 7) / 8 + scale_bytes + (info.has_zero_point ? 1 : 0);
}

}  // namespace tensorslim
