// INT8 activations x INT8 weights (W8A8): activation quantization and the s32-accumulating
// GEMM with a fused rescale.
//
// Specification (the scalar reference implements it literally, in fp32):
//   x' = x * inv_smooth[k]                     (inv_smooth optional: SmoothQuant's 1/s)
//   per token (s8):  scale[m] = max_k |x'[m,k]| / 127 (1 where that is 0)
//                    q = clamp(rne(x' / scale[m]), -127, 127)   (u8 output: q + 128, zero point 128)
//   static (u8/s8):  q = clamp(rne(x' / scale) + zero_point, qmin, qmax) of the code dtype
//   GEMM:            acc[m,n] = sum_k (q[m,k] - zero_point) * w[n,k]     (exact, int32)
//                    out[m,n] = float(acc) * (act_scale[m or 0] * w_scale[n]) + bias[n]
// oneDNN's fused epilogue may round the rescale in another order: it is tested against the
// reference to a few ulp, the integer part is exact.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "tensorslim/gemm.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {

// x: [M, K] f32, rows contiguous.  inv_smooth: [K] f32 or nullptr.  q: [M, K] s8, or u8 for
// the same codes shifted by 128 (use zero point 128 in linear_int8: one oneDNN layout for all).
// scales: [M] f32.  backend: kReference or kAuto/kNative (AVX-512 or AVX2, the active ISA).
void quantize_per_token(const TensorView& x, const TensorView* inv_smooth, const TensorView& q,
                        const TensorView& scales, GemmBackend backend);

// x: [M, K] f32.  q: [M, K] u8 (asymmetric, zero_point in 0..255) or s8 (zero_point 0).
void quantize_static(const TensorView& x, const TensorView* inv_smooth, float scale,
                     int32_t zero_point, const TensorView& q, GemmBackend backend);

// qx: [M, K] u8 or s8.  act_scales: [1] (static) or [M] (per token) f32.  qweight: [N, K] s8.
// w_scales: [N] f32.  bias: [N] f32 or nullptr.  out: [M, N] f32.
// backend: kReference (scalar int32), kOneDNN (only where its kernel is exact: VNNI/AMX),
// kNative (ours: VNNI below kInt8PanelMinRows rows on AVX-512 VNNI CPUs, else the AVX2
// kernels, exact on every AVX2 CPU), kAuto (our VNNI kernels for few rows, else oneDNN where
// exact, else ours).
// K = 0 gives out = bias (or 0).
// packed: nullptr, or linear_int8_pack's copy of qweight under the active ISA: on AVX-512
// VNNI CPUs without AMX our VNNI panels, on AVX2 CPUs whose oneDNN kernel is inexact our AVX2
// panels (kAuto / kNative then run either at every row count), elsewhere oneDNN's blocked
// layout, read by oneDNN with u8 activations instead of re-blocking qweight on every call.
void linear_int8(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                 const TensorView& qweight, const TensorView& w_scales, const TensorView* bias,
                 const TensorView& out, GemmBackend backend, const TensorView* packed = nullptr);

// Bytes of qweight [N, K] in that packed layout (0: no packing here, e.g. where oneDNN's
// kernel would not be exact and ours runs on the plain weights).
int64_t linear_int8_packed_bytes(int64_t K, int64_t N);
// Writes that layout into packed (uint8, contiguous, linear_int8_packed_bytes(K, N) bytes).
void linear_int8_pack(const TensorView& qweight, const TensorView& packed);
// Whether a layer should keep that packed copy: false where oneDNN's kernels run faster on
// the plain weight (AMX) or where there is no packing.
bool linear_int8_packing_pays();
// The packed layout for a [N, K] weight under the active ISA: "vnni_panels" (AVX-512 VNNI
// without AMX), "onednn" (oneDNN's, where its kernel is exact), "avx2_panels" (AVX2 where
// oneDNN's is not: ours, exact) or "none".
const char* linear_int8_packed_layout(int64_t K, int64_t N);

namespace cpu {
void quantize_per_token_reference(const TensorView& x, const TensorView* inv_smooth,
                                  const TensorView& q, const TensorView& scales);
void quantize_static_reference(const TensorView& x, const TensorView* inv_smooth, float scale,
                               int32_t zero_point, const TensorView& q);
// AVX-512 versions, bit-exact with the references; false when the CPU lacks AVX-512.
bool quantize_per_token_avx512(const TensorView& x, const TensorView* inv_smooth,
                               const TensorView& q, const TensorView& scales);
bool quantize_static_avx512(const TensorView& x, const TensorView* inv_smooth, float scale,
                            int32_t zero_point, const TensorView& q);
// Rows per task of the activation quantizers (~64K values on torch's OpenMP team, which is
// awake beside torch's ops: 1792 x 1536 per token 1.09 -> 0.55 ms on 2 threads; from 256K to
// 64K, MiniLM's 384 x 384 dynamic INT8 layer at 640 / 200 rows 0.326-0.330 -> 0.290-0.294 /
// 0.114-0.115 -> 0.108 ms, 2-core Zen 4; ~4M values on our own pool, whose wake-up while
// oneDNN's threads spin cost ~8 ms on a busy 2-core machine).
int64_t activation_row_grain(int64_t K);
[[noreturn]] void throw_activation_not_finite(int64_t row);
// The same error for the row (of K values) of the first NaN / Inf among x[begin, end).
[[noreturn]] void throw_first_not_finite(const float* x, int64_t begin, int64_t end, int64_t K);
// AVX2 versions, bit-exact with the references; false when the CPU lacks AVX2.
bool quantize_per_token_avx2(const TensorView& x, const TensorView* inv_smooth,
                             const TensorView& q, const TensorView& scales);
bool quantize_static_avx2(const TensorView& x, const TensorView* inv_smooth, float scale,
                          int32_t zero_point, const TensorView& q);

void linear_int8_reference(const TensorView& qx, const TensorView& act_scales,
                           int32_t act_zero_point, const TensorView& qweight,
                           const TensorView& w_scales, const TensorView* bias,
                           const TensorView& out);
// Exact on every AVX2 CPU (no VNNI needed), bit-exact with the reference; false when the
// active ISA is below AVX2.
bool linear_int8_avx2(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                      const TensorView& qweight, const TensorView& w_scales,
                      const TensorView* bias, const TensorView& out);
// The same arithmetic for many activation rows (weight packed into 8-column panels per call,
// 4 x 16 register tiles); linear_int8_avx2 hands it batches of kInt8PanelMinRows and more of
// weights below kInt8LargeWeight values (with vpdpbusd, cpu::avx2_vnni, any weight from 32
// rows). prepacked: those
// panels packed once (linear_int8_avx2_pack), read at every row count, with uint8 codes as
// they are where the header says every weight code lies in [-64, 64].
bool linear_int8_panels_avx2(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                             const TensorView& qweight, const TensorView& w_scales,
                             const TensorView* bias, const TensorView& out,
                             const uint8_t* prepacked = nullptr);
// The AVX2 panels' packed copy (linear_int8_pack's layout on AVX2 CPUs where oneDNN's kernel is
// inexact): a kInt8Avx2HeaderBytes header (magic "tsi8av21", int64 K, N, and 1 where every
// code lies in [-64, 64]), ceil(N / 8) panels of [ceil(K / 4)][8 rows][4 bytes] (zero past K
// and N), then each row's sum of codes as int32 (ceil(N / 8) * 8 of them, 0 past N).
constexpr int64_t kInt8Avx2HeaderBytes = 64;
int64_t linear_int8_avx2_packed_bytes(int64_t K, int64_t N);
void linear_int8_avx2_pack(const TensorView& qweight, const TensorView& packed);
// Whether packed (at least kInt8Avx2HeaderBytes) holds that layout of a [N, K] weight.
bool linear_int8_avx2_packed_matches(const uint8_t* packed, int64_t K, int64_t N);
// Whether that header says every code lies in [-64, 64].
bool linear_int8_avx2_packed_narrow(const uint8_t* packed);
constexpr int64_t kInt8PanelMinRows = 16;
// The panel kernels transpose the whole weight on every call; a weight far larger than the
// caches then streams through them once more, while the GEMVs read it as stored (each block
// of rows once from memory, again from L2 per 4 tokens), so they keep more rows for it.
// Measured (2-core Zen 4, route off, alternating runs), 4096 x 4096: AVX-512 VNNI panels at 8 /
// 16 rows 0.71-0.81 / 1.00-1.25 ms, GEMV 0.51-0.61 / 1.02-1.11, alike at 32; AVX2 (capped)
// panels at 16 / 32 rows 3.9 / 5.7-6.2 ms, GEMV 2.5-2.9 / 4.6-6.3. Weights of 4M values: alike
// at 8 rows, panels ahead from 16; MiniLM's 384 x 1536: panels ahead from 12 (AVX2: from 16).
// On AVX2, weights of kInt8LargeWeight values and more keep the GEMV at every row count: per-call
// panels against it (AVX2 caps, full-range codes, interleaved) 4096 x 4096 at 32 / 128 / 512 rows
// 7.73 / 24.79 / 95.27 against 5.58 / 20.85 / 81.69 ms, 4096 x 11008 41.98 / 85.67 / 270.81
// against 14.86 / 55.28 / 223.16, 11008 x 4096 38.42 / 79.36 / 232.89 against 13.82 / 54.67 /
// 212.29 (the panels used to take them from 32 rows).
constexpr int64_t kInt8LargeWeight = int64_t{1} << 24;
// AVX-512 VNNI CPUs, few rows (gemm_int8_avx512.cpp): vpdpbusd on the plain int8 weight, exact
// without corrections, bit-exact with the reference; false where the active ISA is not
// AVX-512 or the CPU lacks VNNI. Below kInt8VnniMaxRows (kInt8VnniLargeMaxRows for weights of
// kInt8LargeWeight values and more) a GEMV (4 x 4 tiles of dot products);
// from there 48 weight rows at a time transposed into 4-byte panels and 8-token tiles, no
// horizontal sums. linear_int8 picks them below kInt8VnniPanelMaxRows rows over oneDNN
// (kAuto; oneDNN took 1.2-4x their time there at 4096^2 and MiniLM's shapes on Sapphire
// Rapids), and below kInt8PanelMinRows over the AVX2 kernels (kNative).
bool int8_vnni_available();
bool linear_int8_vnni(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                      const TensorView& qweight, const TensorView& w_scales,
                      const TensorView* bias, const TensorView& out);
// prepacked: nullptr (each call transposes the weight into its panels), or the weight
// already in them (linear_int8_vnni_pack).
bool linear_int8_vnni_panels(const TensorView& qx, const TensorView& act_scales,
                             int32_t act_zero_point, const TensorView& qweight,
                             const TensorView& w_scales, const TensorView* bias,
                             const TensorView& out, const uint8_t* prepacked = nullptr);
// The panels packed once (what linear_int8_pack writes on AVX-512 VNNI CPUs whose oneDNN has
// no AMX kernel): a kInt8VnniHeaderBytes header (magic, K, N), ceil(N / 16) panels of
// [ceil(K / 4)][16 rows][4 bytes] (zero past K and N), then each panel's 16 int32 row sums.
// Per-call packing cost ~0.4-0.5 ms of 1.0-1.8 ms at 16-32 rows (4096 x 4096, Zen 4).
constexpr int64_t kInt8VnniHeaderBytes = 64;
int64_t linear_int8_vnni_packed_bytes(int64_t K, int64_t N);
void linear_int8_vnni_pack(const TensorView& qweight, const TensorView& packed);
// Whether packed (at least kInt8VnniHeaderBytes) holds that layout of a [N, K] weight.
bool linear_int8_vnni_packed_matches(const uint8_t* packed, int64_t K, int64_t N);
constexpr int64_t kInt8VnniMaxRows = 8;
constexpr int64_t kInt8VnniLargeMaxRows = 16;  // for weights of kInt8LargeWeight values and more
constexpr int64_t kInt8VnniPanelMaxRows = 40;
// Returns false when oneDNN has no exact implementation for this combination (none at all,
// or one without VNNI whose int16 pair sums saturate).
bool linear_int8_onednn(const TensorView& qx, const TensorView& act_scales,
                        int32_t act_zero_point, const TensorView& qweight,
                        const TensorView& w_scales, const TensorView* bias, const TensorView& out,
                        const TensorView* packed = nullptr);
// The oneDNN implementation name for these arguments (e.g. "brg_matmul:avx512_core_vnni"),
// or "" when there is none: lets tests check that an optimized kernel, not ref, runs.
// An inexact one is named with " (not exact: unused)" appended.
std::string linear_int8_onednn_impl(const TensorView& qx, const TensorView& act_scales,
                                    int32_t act_zero_point, const TensorView& qweight,
                                    const TensorView& w_scales, const TensorView* bias,
                                    const TensorView& out, const TensorView* packed = nullptr);
int64_t linear_int8_packed_bytes_onednn(int64_t K, int64_t N);
bool linear_int8_packing_pays_onednn();
bool onednn_int8_uses_amx();  // its INT8 matmul runs AMX tiles on this CPU
void linear_int8_pack_onednn(const TensorView& qweight, const TensorView& packed);
}  // namespace cpu

}  // namespace tensorslim
