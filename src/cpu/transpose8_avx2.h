// The 8 x 8 dword transpose that AVX2 files compiled with -mavx2 share (the W4A8 panels and
// the INT8 GEMM's weight packing). Included by AVX2 translation units only: the anonymous
// namespace gives each its own copy under its own flags.
#pragma once

#include <immintrin.h>

namespace tensorslim {
namespace cpu {
namespace {

// v[r] = 8 dwords of row r  ->  v[j] = dword j of rows 0..7.
inline void transpose8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  // u[4b + c], row quad b: 128-bit lane L holds column c + 4L of rows 4b..4b+3.
  for (int b = 0; b < 8; b += 4) {
    u[b] = _mm256_unpacklo_epi64(t[b], t[b + 2]);
    u[b + 1] = _mm256_unpackhi_epi64(t[b], t[b + 2]);
    u[b + 2] = _mm256_unpacklo_epi64(t[b + 1], t[b + 3]);
    u[b + 3] = _mm256_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
    v[c + 4] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
