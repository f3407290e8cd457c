// One token's s8 codes in the W4A8 kernels' order, AVX2 (compiled with -mavx2): the panel
// kernels (gemm_w4a8_avx2.cpp) and those on the packed copy (w4a8_interleaved_avx2.cpp).
// Inside an anonymous namespace: each file compiles its own copy with its own -m flags.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace tensorslim {
namespace cpu {
namespace {

// Even k first, then odd k, in every 8 bytes (the order of the unpacked nibbles).
inline void relayout_row256(const int8_t* src, int64_t K, int64_t Kp, int8_t* dst) {
  const __m256i order = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                         0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t k = 0; k < Kp; k += 32) {
    alignas(32) int8_t tmp[32] = {};  // the tail: zero padding past K, stores up to Kp
    const bool whole = k + 32 <= K && k + 32 <= Kp;
    const int8_t* s = src + k;
    if (!whole) {
      std::memcpy(tmp, s, static_cast<size_t>(std::max<int64_t>(0, std::min<int64_t>(32, K - k))));
      s = tmp;
    }
    const __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)), order);
    if (whole) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), v);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
      std::memcpy(dst + k, tmp, static_cast<size_t>(std::min<int64_t>(32, Kp - k)));
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
