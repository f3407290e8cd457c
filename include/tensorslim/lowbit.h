// Quantize / dequantize / weight-only linear for every row of the format table:
// N-bit integers (2..8), FP8 E4M3 / E5M2, NVFP4, MXFP4, binary and ternary.
// (quantize.h keeps the original int8/int4 API; for those rows both give the same bytes.)
//
// Reference semantics, per group of values g (all arithmetic IEEE fp32 unless noted):
//   int<N>/uint<N>: as quantize.h (scale = amax/qmax, or (hi-lo)/(qmax-qmin) with a zero point).
//   fp8:     scale = amax / fmax (1 if amax == 0); code = fp8_encode(x / scale) (RNE, saturating);
//            x' = fp8_decode(code) * scale.
//   nvfp4:   per tensor ts = amax_tensor / (6 * 448) (1 if 0); per block of 16
//            bs = e4m3_encode(amax_block / 6 / ts); s = e4m3_decode(bs) * ts;
//            code = s > 0 ? e2m1_encode(x / s) : 0;  x' = (e2m1_decode(code) * e4m3_decode(bs)) * ts.
//   mxfp4:   per block of 32, e = floor(log2 amax_block) - 2 (E2M1's emax is 2), clamped to
//            [-127, 127], -127 for an all-zero block; byte = e + 127; s = 2^e;
//            code = e2m1_encode(x / s) (saturates at +-6);  x' = e2m1_decode(code) * s.
//   binary:  scale = mean|x| (summed in float64, then rounded to fp32); bit = x >= 0 (zero -> +1);
//            x' = bit ? scale : -scale.
//   ternary: m = mean|x| (float64 sum, rounded to fp32); t = 0.7f * m; q = |x| > t ? sign(x) : 0;
//            scale = mean of |x| over the entries with q != 0 (float64 sum), 0 when there are
//            none (which happens only for an all-zero group); x' = q * scale.
// Codes are packed as described in formats.h.
#pragma once

#include <cstdint>

#include "tensorslim/formats.h"
#include "tensorslim/gemm.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {

// group_size: -1 = one scale for the whole tensor, cols = one per row, otherwise any
// positive size with group_size * bits % 8 == 0 (when a row has more than one group).
// A row has ceil(cols / group_size) groups; the last one holds the remaining
// cols - (groups - 1) * group_size values (all of them when group_size > cols), and its
// scale is computed from those values only. Codes stay one bit stream per row (full groups
// are whole bytes, so the short group starts on a byte; its last byte is zero-padded).
// NVFP4 / MXFP4 need group_size == 16 / 32 (any row length).
// x: [rows, cols] f32/bf16/f16, any strides.  q: [rows, packed_row_bytes] (int8 for the int8
// row, uint8 otherwise).  scales: [rows, ceil(cols/group)] ([1, 1] per tensor), f32, or uint8
// E4M3 / E8M0 codes for NVFP4 / MXFP4.  zero_points: uint8, same shape, only for uint<N>.
// tensor_scale: [1] f32, only for NVFP4 (written by quantize, read by the others).
void quantize_lowbit(const TensorView& x, Format fmt, int64_t group_size, const TensorView& q,
                     const TensorView& scales, const TensorView* zero_points,
                     const TensorView* tensor_scale);

// out: [rows, cols] f32/bf16/f16 with contiguous rows.
void dequantize_lowbit(const TensorView& q, const TensorView& scales,
                       const TensorView* zero_points, const TensorView* tensor_scale, Format fmt,
                       int64_t group_size, const TensorView& out);

// Values one scale covers: the row for -1 (per tensor) or the row length, else group_size
// (also when a row is empty and has no groups). The last group of a row may hold fewer:
// lowbit_group_values() below.
inline int64_t values_per_group(int64_t cols, int64_t group_size) {
  return group_size == -1 || group_size == cols ? cols : group_size;
}

// Scale groups per row of `cols` values for a group size (not -1): ceil(cols / group).
inline int64_t lowbit_groups(int64_t cols, int64_t group_size) {
  return group_size == cols ? 1 : (cols + group_size - 1) / group_size;
}

// Values in group g of a row of `cols` values, `group` values per full group.
inline int64_t lowbit_group_values(int64_t cols, int64_t group, int64_t g) {
  const int64_t left = cols - g * group;
  return left < group ? left : group;
}

// Validates shapes, dtypes and the group size; returns the number of scale groups per row.
int64_t check_lowbit_args(const TensorView& x_or_out, Format fmt, int64_t group_size,
                          const TensorView& q, const TensorView& scales,
                          const TensorView* zero_points, const TensorView* tensor_scale);

// out[M, N] = x[M, K] @ dequantize_lowbit(qweight)[N, K]^T + bias, x / out f32 with
// contiguous rows, bias [N] f32 or nullptr, group_size != -1. workspace: nullptr or a
// [W, K] f32 buffer (1 <= W <= N); on the scalar path, when given and M >
// lowbit_gemv_max_rows(), the weight is decoded W rows at a time into it and each tile
// multiplied with oneDNN's sgemm.
// Backends: kReference (scalar, float64 accumulation), kNative (AVX-512 / AVX2 fused
// decode), kAuto (native when it fits). kOneDNN is not a separate backend here (ValueError).
// The fused GEMV runs up to kLowbitGemvMaxRows rows on every ISA, the NVFP4 / MXFP4
// activation pieces (AVX-512 VNNI) up to 32 rows of a weight of more than kPanelSmallWeight
// values, the panel GEMM (each weight row decoded once per call) past them; the scalar path
// decodes tiles for oneDNN's sgemm past the GEMV's rows. Single 4096 x 4096 layers, AVX-512
// (Zen 4), GEMV / panel GEMM ms: int3 at 5 / 6 / 8 / 16 rows 2.59 / 2.74, 3.21 / 2.89,
// 4.02 / 3.13, 7.96 / 4.40; fp8 at 5 / 8 / 16 2.61 / 2.84, 3.78 / 3.29, 7.14 / 4.43; nvfp4 on
// the pieces at 16 / 32 rows 4.15 / 4.89, 7.60 / 7.20. oneDNN's sgemm on decoded tiles,
// which took 64+ rows before, ran 4.7x slower than the panel GEMM at 256 rows in a stack of
// layers with GELU between (fp8 824 / 176 ms): its runtime's threads contend with torch's.
constexpr int64_t kLowbitGemvMaxRows = 8;
int64_t lowbit_gemv_max_rows();
void linear_lowbit(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                   const TensorView* zero_points, const TensorView* tensor_scale,
                   const TensorView* bias, Format fmt, int64_t group_size, const TensorView& out,
                   const TensorView* workspace, GemmBackend backend);

namespace cpu {

// The unpacked form of one weight row's codes (value i at bit offset i*bits).
void unpack_codes(const uint8_t* packed, int64_t n, int bits, bool sign_extend, int32_t* codes);
void pack_codes(const int32_t* codes, int64_t n, int bits, uint8_t* packed);

// Scalar reference dequantization of one weight row (the specification the kernels match).
struct LowbitWeight {
  const FormatInfo* info;
  const uint8_t* q;  // [N, row_bytes]
  int64_t q_stride;
  const void* scales;  // [N, groups] f32 or uint8 (E4M3 / E8M0)
  const uint8_t* zero_points;  // same layout, uint<N> only
  float tensor_scale;          // NVFP4 only
  int64_t groups, group;       // groups per row, values per group
  int64_t scale_stride;        // scales per row: groups, or 0 for one per tensor
};
void dequantize_row_reference(const LowbitWeight& w, int64_t n, int64_t K, float* out);
// Values [k0, k1) of weight row n into out[0, k1 - k0) (the same arithmetic): the vector
// kernels decode a row's short tail (fewer values than a vector) with it.
void dequantize_values_reference(const LowbitWeight& w, int64_t n, int64_t k0, int64_t k1,
                                 float* out);

// Fused decode GEMV: out rows [0, M) for weight rows [n0, n1), AVX-512 (16 values per step)
// or AVX2 (8). native_lanes: the active ISA's step, 0 when it has no native kernel;
// native_fits: whether every group starts on a multiple of it (one group per row, or group
// a multiple of the step); any K: each row's last values that fill no whole step (in its
// last group) are decoded by dequantize_values_reference.
int lowbit_native_lanes();
bool lowbit_lanes_fit(int lanes, int64_t K, int64_t group);
bool linear_lowbit_native_fits(const FormatInfo& info, int64_t K, int64_t group);
void linear_lowbit_avx512(const float* x, int64_t ldx, int64_t M, const LowbitWeight& w,
                          int64_t K, const float* bias, float* out, int64_t ldo, int64_t n0,
                          int64_t n1);
void linear_lowbit_avx2(const float* x, int64_t ldx, int64_t M, const LowbitWeight& w, int64_t K,
                        const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1);

// AVX-512 / AVX2 pieces of quantize_lowbit, bit-exact with the scalar ones: lo = min(min x,
// 0), hi = max(max x, 0) (false if any value is NaN/Inf), and the codes of one group (false
// when the format has no vector encoder).
bool lowbit_min_max_avx512(const float* x, int64_t n, float* lo, float* hi);
bool lowbit_encode_avx512(const FormatInfo& info, float scale, int32_t zero_point, float threshold,
                          const float* x, int64_t n, int32_t* codes);
bool lowbit_min_max_avx2(const float* x, int64_t n, float* lo, float* hi);
bool lowbit_encode_avx2(const FormatInfo& info, float scale, int32_t zero_point, float threshold,
                        const float* x, int64_t n, int32_t* codes);
// Vector decode of one weight row (bit-exact with dequantize_row_reference); the _native
// one picks the ISA whose lanes `lanes` is (16 or 8).
void dequantize_row_avx512(const LowbitWeight& w, int64_t n, int64_t K, float* out);
void dequantize_row_avx2(const LowbitWeight& w, int64_t n, int64_t K, float* out);
void dequantize_row_native(int lanes, const LowbitWeight& w, int64_t n, int64_t K, float* out);

}  // namespace cpu
}  // namespace tensorslim
