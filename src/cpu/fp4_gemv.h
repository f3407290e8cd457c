// Fused GEMV for the E2M1 formats (NVFP4: blocks of 16 values, an E4M3 scale times the fp32
// tensor scale; MXFP4: blocks of 32, an E8M0 scale) at a few activation rows.
//
// lowbit_gemv_tiles.h decodes each code into its scaled weight in the values' order: per 8
// values a broadcast, a shift per lane, two permutes and a blend, and per NVFP4 block four
// multiplies to rescale the code table; that vector work, not the weight's bytes, set its
// speed (NVFP4 at 11-17% of copy bandwidth on Zen 4). Here the activations are re-laid once
// per call, per block of 2L values (L = the vector's lanes) as [the even k | the odd k], so
// the low nibbles of L packed bytes, zero-extended to 32-bit lanes by one instruction, meet
// the even activations and the high nibbles the odd ones. A code's value comes from one
// constant table (one permute; on AVX2 an 8-entry table and the sign bit moved in by a
// shift and an xor), a scale group's products are summed unscaled, and that sum is scaled
// once. The rounding order is not the reference's x * (value * scale); the result stays
// within the GEMV's tolerance (1e-6 of sum |x w| against float64, tests). x * value before
// the scale could overflow where the scaled product does not, so activations above
// kFp4MaxActivation in magnitude (or NaN / Inf) leave the call to lowbit_gemv_tiles.h.
#pragma once

#include <cstdint>

#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {

constexpr float kFp4MaxActivation = 0x1p100f;

// Activations as the kernels read them: row m of [M, K] at x + m * K, each block of 2L
// values stored as its even-k values then its odd-k values.
struct Fp4Acts {
  const float* x;
  int64_t M, K;
};

// Whether the kernel for `lanes` (16: AVX-512, 8: AVX2) takes this weight: NVFP4 or MXFP4,
// K a multiple of 2 * lanes (whole blocks), groups of the format's size.
bool fp4_gemv_fits(const FormatInfo& info, int64_t K, int64_t group, int lanes);
// Packs x [M, K] (row stride ldx) for `lanes` into out [M * K]; false (out partly written)
// where a value is NaN, Inf or above kFp4MaxActivation in magnitude.
bool pack_fp4_activations(const float* x, int64_t ldx, int64_t M, int64_t K, int lanes, float* out);
// out[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for weight rows [n0, n1) and all M rows of a.
void linear_fp4_avx512(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo,
                       int64_t n0, int64_t n1);
void linear_fp4_avx2(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo,
                     int64_t n0, int64_t n1);

}  // namespace cpu
}  // namespace tensorslim
