// The format table: one row per number format. Kernels, bindings and tests
// read what they need from here; adding a format is adding a row.
//
// Codes as the row's encode/decode see them:
//   integers (int<N>/uint<N>): the signed or unsigned integer value, qmin..qmax;
//   floats (fp8_e4m3, fp8_e5m2, nvfp4/mxfp4 elements = E2M1): the raw bit pattern 0..2^bits-1;
//   binary: the bit (1 = +1, 0 = -1);  ternary: -1, 0 or +1.
// Packing (every format): codes form a little-endian bit stream per row, value i at bit
// offset i*bits (LSB first), signed codes as `bits`-wide two's complement, rows padded
// to whole bytes. For 4 and 8 bits this is the INT4 low-nibble-first layout and plain bytes.
#pragma once

#include <cstdint>

namespace tensorslim {

enum class Format : int32_t {
  kInt8 = 0,   // signed 8-bit, symmetric (no zero point)
  kUInt8 = 1,  // unsigned 8-bit with a zero point (asymmetric)
  kInt4 = 2,   // signed 4-bit, symmetric, two per byte, low nibble first
  kUInt4 = 3,  // unsigned 4-bit with a zero point, two per byte, low nibble first
  kFP8E4M3 = 4,  // OCP FP8 E4M3: bias 7, max 448, no Inf, NaN = S.1111.111; fp32 scale
  kFP8E5M2 = 5,  // OCP FP8 E5M2: bias 15, max 57344, IEEE Inf/NaN; fp32 scale
  kNVFP4 = 6,    // E2M1, blocks of 16, E4M3 block scale + one fp32 tensor scale
  kMXFP4 = 7,    // E2M1, blocks of 32, E8M0 (power of two) block scale (OCP MX v1.0)
  kInt2 = 8,     // N-bit integers: int<N> symmetric, uint<N> with a zero point
  kUInt2 = 9,
  kInt3 = 10,
  kUInt3 = 11,
  kInt5 = 12,
  kUInt5 = 13,
  kInt6 = 14,
  kUInt6 = 15,
  kInt7 = 16,
  kUInt7 = 17,
  kBinary = 20,   // 1 bit: 1 = +1, 0 = -1; fp32 scale = mean |x| per group (XNOR-Net)
  kTernary = 21,  // 2 bits {-1: 0b11, 0: 0b00, +1: 0b01}; TWN threshold, fp32 scale
};

// How a group's scale is stored: fp32, one E4M3 byte (NVFP4), one E8M0 byte (MXFP4).
enum class ScaleFormat : int32_t { kFloat32 = 0, kE4M3 = 1, kE8M0 = 2 };

// Reference encode/decode of one value: the specification every kernel matches.
// `scale` is the group's decoded fp32 scale (for NVFP4: block scale * tensor scale).
// Ternary's encode is the exception: its second argument is the threshold t (see formats.md).
using EncodeFn = int32_t (*)(float x, float scale, int32_t zero_point);
using DecodeFn = float (*)(int32_t code, float scale, int32_t zero_point);

struct FormatInfo {
  Format format;
  const char* name;
  int bits;               // bits per stored value
  bool has_zero_point;    // asymmetric formats carry one uint8 zero point per group
  int32_t qmin, qmax;     // code range
  int32_t scale_divisor;  // integers: scale = range / scale_divisor (amax/qmax or (max-min)/(qmax-qmin))
  int block_size;         // 0: any group size the caller picks (32..256, a row, the tensor)
  ScaleFormat scale_format;
  EncodeFn encode;
  DecodeFn decode;
  bool is_float;           // element is a small float (E4M3, E5M2, E2M1)
  int exp_bits, man_bits;  // float element layout (0 for the others)
  float max_value;         // largest finite element magnitude (floats: 448, 57344, 6)
  bool has_tensor_scale;   // NVFP4: one extra fp32 scale for the whole tensor
  const float* code_values;  // float/binary/ternary: value of each bit pattern (2^bits
                             // entries, scale 1); nullptr for the integer rows
};

// Rows 0..3 (int8, uint8, int4, uint4) are the integer formats that quantize() and
// linear_weight_only() (quantize.h, gemm.h) take; lowbit.h covers every row.
constexpr int kNumFormats = 4;
constexpr int kNumFormatRows = 20;                // every row of format_table()
const FormatInfo& format_info(Format f);          // ValueError for an unknown id
const FormatInfo* format_table();                 // kNumFormatRows rows, ids 0..3 first
const FormatInfo* find_format(const char* name);  // nullptr when unknown
const FormatInfo* find_format_id(int32_t id);     // nullptr when unknown

// Bytes one group of `group` values takes: packed codes, one scale, a zero point if any.
// (NVFP4's single tensor scale is not part of a block.)
int64_t bytes_per_block(const FormatInfo& info, int64_t group);
// Bytes of `cols` codes packed in a row (sub-byte formats round up to whole bytes).
inline int64_t packed_row_bytes(const FormatInfo& info, int64_t cols) {
  return (cols * info.bits + 7) / 8;
}

// One packed block of each block format, as it would be laid out in memory if stored
// together; the sizes are what bytes_per_block() returns.
struct NVFP4Block {
  uint8_t codes[8];  // 16 E2M1 codes, low nibble first
  uint8_t scale;     // E4M3
};
static_assert(sizeof(NVFP4Block) == 9, "NVFP4 block: 16 x 4 bits + one E4M3 byte");
struct MXFP4Block {
  uint8_t codes[16];  // 32 E2M1 codes, low nibble first
  uint8_t scale;      // E8M0
};
static_assert(sizeof(MXFP4Block) == 17, "MXFP4 block: 32 x 4 bits + one E8M0 byte");

// Scalar reference conversions of the small float formats. Encoders round to nearest,
// ties to even, and saturate finite values (and Inf, except E5M2 which keeps Inf) to
// +-max; NaN maps to a NaN pattern (E4M3 S.1111.111, E5M2 S.11111.10); E2M1 has no NaN
// and maps it to +0. Sign is kept, -0 included.
uint8_t e4m3_encode(float x);
float e4m3_decode(uint8_t code);
uint8_t e5m2_encode(float x);
float e5m2_decode(uint8_t code);
uint8_t e2m1_encode(float x);  // 4-bit code in the low nibble
float e2m1_decode(uint8_t code);
// E8M0: byte = exponent + 127 for 2^exponent, 255 = NaN. Encoding takes an exponent,
// clamped to [-127, 127].
uint8_t e8m0_from_exponent(int exponent);
float e8m0_decode(uint8_t code);

}  // namespace tensorslim
