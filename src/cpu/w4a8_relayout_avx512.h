// One token's s8 codes in the W4A8 kernels' order, AVX-512 (compiled with -mavx512bw): the
// panel kernels (gemm_w4a8_avx512.cpp) and those on the packed copy
// (w4a8_interleaved_avx512.cpp). Inside an anonymous namespace: each file compiles its own
// copy with its own -m flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

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

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
