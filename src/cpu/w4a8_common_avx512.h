// What the AVX-512 W4A8 kernels share (compiled with -mavx512bw): the panel kernels
// (gemm_w4a8_avx512.cpp) and those on the packed copy (w4a8_interleaved_avx512.cpp) re-lay
// each token's s8 codes the same way and write their 16-row outputs the same way. Inside an
// anonymous namespace: each file compiles its own copy with its own -m flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "half.h"
#include "tensorslim/gemm_w4a8.h"

namespace tensorslim {
namespace cpu {
namespace {

// The first n of 64 bytes (none for n <= 0).
inline __mmask64 bytes_mask(int64_t n) {
  if (n <= 0) return 0;
  return n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
}

// One token's s8 codes in kernel order: within every 16-byte lane (two blocks of 8), even
// k first, then odd k; masked-off bytes load as 0, the padding up to Kp.
inline void relayout_row512(const int8_t* src, int64_t K, int64_t Kp, int8_t* dst) {
  const __m512i order = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15));
  for (int64_t k = 0; k < Kp; k += 64) {
    const __m512i v = _mm512_maskz_loadu_epi8(bytes_mask(K - k), src + k);
    _mm512_mask_storeu_epi8(dst + k, bytes_mask(Kp - k), _mm512_shuffle_epi8(v, order));
  }
}

// Outputs of tokens m0 .. m0 + T - 1, rows n0 .. n0 + rows - 1 (one lane per row, rows <= 16)
// from their fp32 group sums: y = acc * act_scale (+ bias), as fp32 or rounded once to bf16.
template <int T>
__attribute__((always_inline)) inline void store_tokens512(const W4A8Args& a, const __m512 (&facc)[T],
                                                           int64_t n0, int64_t rows, int64_t m0) {
  const __mmask16 keep = static_cast<__mmask16>(rows >= 16 ? 0xFFFF : (1u << rows) - 1);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(keep, a.bias + n0) : _mm512_setzero_ps();
  for (int t = 0; t < T; ++t) {
    __m512 y = _mm512_mul_ps(facc[t], _mm512_set1_ps(a.act_scales[m0 + t]));
    if (a.bias) y = _mm512_add_ps(y, bias);  // no bias: no + 0 (it would turn -0 into +0)
    const int64_t at = (m0 + t) * a.ldo + n0;
    if (!a.out_bf16) {
      _mm512_mask_storeu_ps(static_cast<float*>(a.out) + at, keep, y);
    } else {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, y);
      uint16_t* o16 = static_cast<uint16_t*>(a.out) + at;
      for (int64_t r = 0; r < rows; ++r) o16[r] = float_to_bf16(tmp[r]);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
