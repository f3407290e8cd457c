// W4A8: INT4 weights x INT8 activations quantized per token at run time, integer group dot
// products (AVX-512 VNNI vpdpbusd, or vpmaddubsw + vpmaddwd on AVX-512 / AVX2) and an fp32
// rescale per group.
//
// Specification (the scalar reference implements it literally):
//   activations: q[m, k] (s8) and a_s[m] = quantize_per_token(x) (gemm_int8.h: max|x| / 127,
//                round half to even); bf16 x is widened to fp32 first.
//   weights:     the int4 / uint4 rows of the format table (quantize.h): codes c[n, k] packed two
//                per byte, low nibble first; offset o[n, g] = 0 (int4, c in -8..7) or the uint8
//                zero point (uint4, c in 0..15); fp32 scale w_s[n, g] per group of G values,
//                ceil(K / G) groups, the last one holding K - (groups - 1) * G values.
//   per group:   d[m, n, g] = sum_{k in g} (c[n, k] - o[n, g]) * q[m, k]        (exact, int32)
//   rescale:     acc = 0; for g = 0, 1, ...: acc = acc + float(d[m, n, g]) * w_s[n, g]
//                out[m, n] = acc * a_s[m] (+ bias[n])        (IEEE fp32, no fused multiply-add;
//                                                             bf16 out: rounded once at the end)
// Every path (scalar, AVX-512 with or without VNNI, AVX2) gives these bits exactly.
#pragma once

#include <cstdint>

#include "tensorslim/formats.h"
#include "tensorslim/gemm.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {

// Largest K for which every int32 above is exact (|d| <= 15 * 127 * K < 2^31).
constexpr int64_t kW4A8MaxK = int64_t{1} << 20;

// out[M, N] = x[M, K] @ W^T + bias as specified above.
// x: [M, K] f32 or bf16, rows contiguous.  qweight: [N, ceil(K / 2)] uint8 (int4 / uint4 codes).
// scales: [N, ceil(K / group)] f32.  zero_points: same shape uint8, values 0..15, uint4 only
// (else nullptr).  bias: [N] f32 or nullptr.  out: [M, N], x's dtype, rows contiguous.
// group_size: K (one scale per output channel) or any even positive size (the last group of a
// row is short when it does not divide K; one group when it exceeds K).
// backend: kReference (scalar), kNative (AVX-512 / AVX2; ValueError where none fits), kAuto (native
// where it fits, else the reference). kOneDNN: ValueError (oneDNN has no such kernel).
// packed: optional, linear_w4a8_pack's copy of these weights; where given, the native kernel
// reads it instead of qweight (same bits; ValueError if it is not that copy of this shape).
void linear_w4a8(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                 const TensorView* zero_points, const TensorView* bias, Format fmt,
                 int64_t group_size, const TensorView& out, GemmBackend backend,
                 const TensorView* packed = nullptr);

// The weights laid out for the native kernels (a copy layers keep next to qweight, never saved):
// a 64-byte header (magic "tsw4a8i1", then int64 N, K, group, has zero points), then per
// 16-row panel: codes [ceil(K / 8) steps][16 rows][4 bytes] (row r's bytes 4j .. 4j+3, i.e.
// codes 8j .. 8j+7, int4 stored as u = code + 8 in each nibble; zeros past K and N), scales
// [groups][16] f32, for uint4 zero points [groups][16] u8, the panel padded to 64 bytes. One
// 64-byte load holds 8 codes of 16 rows, so vpdpbusd sums straight into one lane per row and
// the weights are read as one stream (the row-wise GEMV reads 16 rows side by side and sums
// each row's lanes per group). Bytes of that copy; 0 where no native kernel takes the shape
// (group not a multiple of 8 below K, or K = 0).
int64_t linear_w4a8_packed_bytes(int64_t N, int64_t K, int64_t group_size, Format fmt);
// Writes that copy of linear_w4a8's weights for K inputs (the same checks) into packed
// (uint8, contiguous, linear_w4a8_packed_bytes of them).
void linear_w4a8_pack(const TensorView& qweight, const TensorView& scales,
                      const TensorView* zero_points, Format fmt, int64_t K, int64_t group_size,
                      const TensorView& packed);
// Whether the active ISA has a native kernel, so a packed copy would be read.
bool linear_w4a8_packing_pays();

// Which kernel linear_w4a8 runs for (K, group) with kAuto: "avx512_vnni", "avx512bw"
// (vpmaddubsw + vpmaddwd where the CPU lacks VNNI), "avx2" (the same on 8 lanes) or
// "reference".
const char* linear_w4a8_kernel(int64_t K, int64_t group_size);

namespace cpu {

// The GEMM on activations already quantized (what linear_w4a8 runs after quantize_per_token).
struct W4A8Args {
  const int8_t* qx;             // [M, K] s8 codes, rows contiguous
  const float* act_scales;      // [M]
  const uint8_t* qweight;       // [N, ldw] packed nibbles
  int64_t ldw;                  // qweight row stride in bytes (>= ceil(K / 2))
  const float* scales;          // [N, groups]
  const uint8_t* zero_points;   // [N, groups], nullptr for int4
  const float* bias;            // [N] or nullptr
  int64_t M, N, K, group;       // group: values per scale (K for per channel)
  void* out;                    // [M, ldo] f32 or bf16 (uint16 bits)
  int64_t ldo;
  bool out_bf16;
};

void linear_w4a8_reference(const W4A8Args& a);
// Whether a native kernel takes this shape on this CPU (AVX2 or AVX-512 active,
// group % 8 == 0 or group == K; any K, a short last group included).
bool linear_w4a8_native_fits(int64_t K, int64_t group);
// The AVX-512 / AVX2 kernels (bit-exact with the reference); false when the shape or the
// active ISA does not fit.
bool linear_w4a8_avx512(const W4A8Args& a);
bool linear_w4a8_avx2(const W4A8Args& a);
// Up to kW4A8GemvMaxM tokens, the row-wise kernels (w4a8_gemv.h: packed rows read as stored,
// no panel transpose); false where the group is neither whole chunks (AVX-512: a multiple of
// 128 or one group per row; AVX2: of 64) nor 32 / 64 codes inside one, or the ISA is not
// active. Bit-exact with the reference.
constexpr int64_t kW4A8GemvMaxM = 2;  // measured: 3 tokens ran as fast on the panels
bool linear_w4a8_gemv_avx512(const W4A8Args& a);
bool linear_w4a8_gemv_avx2(const W4A8Args& a);
// The kernels on linear_w4a8_pack's copy (w4a8_interleaved.h), any M, any K and group the
// copy exists for; false where the ISA is not active. Bit-exact with the reference.
bool linear_w4a8_packed_avx512(const W4A8Args& a, const uint8_t* packed);
bool linear_w4a8_packed_avx2(const W4A8Args& a, const uint8_t* packed);
// packed's bytes where it is linear_w4a8_pack's copy of [N, K] weights with this group and
// zero points or none; ValueError naming what differs otherwise.
const uint8_t* checked_w4a8_packed(const TensorView& packed, int64_t N, int64_t K, int64_t group,
                                   bool asym);
// Whether the AVX-512 kernel multiplies with VNNI (vpdpbusd) or with vpmaddubsw + vpmaddwd.
bool w4a8_uses_vnni();
// Tests force the non-VNNI path on CPUs that have VNNI.
void set_w4a8_vnni_enabled(bool enabled);

}  // namespace cpu
}  // namespace tensorslim
