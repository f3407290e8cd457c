// Linears with binary ({-1, +1} x scale) and ternary ({-1, 0, +1} x scale) weights.
//
// Packing (shared with the Python side, see docs/binary_qat.md):
//   binary:  1 bit per weight, bit 1 = +1, bit 0 = -1 (x >= 0 -> +1), LSB first within a
//            byte, each row padded to whole bytes: bits [N, ceil(K / 8)] uint8.
//   ternary: 2 bits per weight, two's complement codes +1 = 0b01, 0 = 0b00, -1 = 0b11,
//            four per byte, lowest bits first: codes [N, ceil(K / 4)] uint8.
//   One fp32 scale per output row: scales [N].
// Padding bits are ignored by every kernel (they may hold anything).
//
//   linear_binary:  y[m, n] = scale[n] * sum_k x[m, k] * sign[n, k] + bias[n]
//   linear_xnor:    the activations are binarized too (XNOR-Net): per row m, sign bits as
//                   above and a_scale[m] = mean_k |x[m, k]|;
//                   dot[m, n] = K - 2 * popcount(a_bits[m] XOR w_bits[n])  (exact integer)
//                   y[m, n] = float(dot) * a_scale[m] * scale[n] + bias[n]
//   linear_ternary: y[m, n] = scale[n] * sum_k x[m, k] * t[n, k] + bias[n]
// x: [M, K] f32 with contiguous rows.  out: [M, N] f32.  bias: [N] f32 or nullptr.
#pragma once

#include <cstdint>

#include "tensorslim/gemm.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {

// backend: kAuto (the AVX-512 or AVX2 kernel of the active ISA, else the reference),
// kReference or kNative (an error when no native kernel fits). kOneDNN is rejected.
void linear_binary(const TensorView& x, const TensorView& bits, const TensorView& scales,
                   const TensorView* bias, const TensorView& out, GemmBackend backend);
void linear_xnor(const TensorView& x, const TensorView& bits, const TensorView& scales,
                 const TensorView* bias, const TensorView& out, GemmBackend backend);
void linear_ternary(const TensorView& x, const TensorView& codes, const TensorView& scales,
                    const TensorView* bias, const TensorView& out, GemmBackend backend);

// The activation side of linear_xnor: x [M, K] f32 -> sign bits [M, bytes >= ceil(K / 8)]
// uint8 (padding bits and bytes set to 0) and a_scale [M] f32 = mean |x| (summed in double).
void binarize_rows(const TensorView& x, const TensorView& bits, const TensorView& scales);

// The integer core of linear_xnor, exposed so tests can check it exactly:
// dots[m, n] = K - 2 * popcount(a_bits[m] XOR w_bits[n]) over the first K bits.
// a_bits [M, >= ceil(K/8)], w_bits [N, >= ceil(K/8)] uint8; dots [M, N] int32.
void xnor_dots(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
               const TensorView& dots, GemmBackend backend);

namespace cpu {
// Scalar references (the specification), in double where a sum of floats is taken.
void linear_binary_reference(const TensorView& x, const TensorView& bits,
                             const TensorView& scales, const TensorView* bias,
                             const TensorView& out);
void linear_ternary_reference(const TensorView& x, const TensorView& codes,
                              const TensorView& scales, const TensorView* bias,
                              const TensorView& out);
void xnor_dots_reference(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                         const TensorView& dots);
// The native path of the active ISA (AVX-512 or AVX2); false when there is none.
bool linear_binary_native(const TensorView& x, const TensorView& bits, const TensorView& scales,
                          const TensorView* bias, const TensorView& out);
bool linear_ternary_native(const TensorView& x, const TensorView& codes,
                           const TensorView& scales, const TensorView* bias,
                           const TensorView& out);
bool xnor_dots_native(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                      const TensorView& dots);
// From kBinaryPanelMinRows activation rows the native path is the panel GEMM on decoded codes
// (binary_panels.cpp); false on the scalar path.
bool linear_binary_panels(const TensorView& x, const TensorView& bits, const TensorView& scales,
                          const TensorView* bias, const TensorView& out);
bool linear_ternary_panels(const TensorView& x, const TensorView& codes, const TensorView& scales,
                           const TensorView* bias, const TensorView& out);
// The per-ISA kernels behind them; each false when the active ISA is not its own.
bool linear_binary_avx512(const TensorView& x, const TensorView& bits, const TensorView& scales,
                          const TensorView* bias, const TensorView& out);
bool linear_ternary_avx512(const TensorView& x, const TensorView& codes,
                           const TensorView& scales, const TensorView* bias,
                           const TensorView& out);
bool xnor_dots_avx512(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                      const TensorView& dots);
bool linear_binary_avx2(const TensorView& x, const TensorView& bits, const TensorView& scales,
                        const TensorView* bias, const TensorView& out);
bool linear_ternary_avx2(const TensorView& x, const TensorView& codes, const TensorView& scales,
                         const TensorView* bias, const TensorView& out);
bool xnor_dots_avx2(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                    const TensorView& dots);
// Whether xnor_dots_avx512 counts bits with VPOPCNTDQ (else a VPSHUFB nibble table).
bool has_vpopcntdq();
// Tests force the fallback popcount on CPUs that have VPOPCNTDQ.
void set_vpopcntdq_enabled(bool enabled);
}  // namespace cpu

}  // namespace tensorslim
