// The 16 x 16 dword transpose that AVX-512 files share (the W4A8 panels and the INT8 GEMM's
// weight panels). Included by AVX-512 translation units only: the anonymous namespace gives
// each its own copy under its own flags.
#pragma once

#include <immintrin.h>

namespace tensorslim {
namespace cpu {
namespace {

// v[r] = 16 dwords of row r  ->  v[j] = dword j of rows 0..15.
inline void transpose16(__m512i v[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  // u[4b + c], row quad b: lane L holds column c + 4L of rows 4b..4b+3.
  for (int b = 0; b < 16; b += 4) {
    u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
    u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
    u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
    u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  // A 4 x 4 transpose of 128-bit lanes across the four row quads.
  for (int c = 0; c < 4; ++c) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    v[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    v[c + 4] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    v[c + 8] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    v[c + 12] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
