// Activation codes for the exact AVX2 INT8 kernels (gemm_int8_avx2.cpp, the GEMV, and
// gemm_int8_panels_avx2.cpp, the GEMM), both computing vpmaddubsw(|w|, sign(c, w)), which is
// exact only for codes c in [-127, 127]. u8 codes q with zero point zp become c = q - s,
// s = 128 or 127, whichever leaves fewer codes outside [-127, 127] in this call (q = 0 for
// 128, q = 255 for 127: post-ReLU activations with zp = 0 are full of q = 0, symmetric ones
// never reach 255). Those few are clamped and corrected afterwards from a list, exactly:
//   sum (q - zp) w = sum c' w + sum_{clamped} (c - c') w[k] + (s - zp) sum w
// s8 codes: s = 0, clamped at -128. Included by AVX2 translation units only (the anonymous
// namespace gives each its own copy under its flags).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "hsum_avx2.h"
#include "parallel.h"

namespace tensorslim {
namespace cpu {
namespace {

// One clamped activation code: its column and c - c' (+1 or -1).
struct Clamp {
  int32_t k;
  int32_t delta;
};

struct Codes {
  std::vector<int8_t> c;          // [M, Kp] codes c' in [-127, 127], zero past K
  std::vector<int64_t> first;     // [M + 1] row m's clamps are clamps[first[m] .. first[m+1])
  std::vector<Clamp> clamps;
  int32_t shift = 0;              // s
};

// Bytes equal to v among n.
int64_t count_byte(const uint8_t* p, int64_t n, uint8_t v) {
  const __m256i vv = _mm256_set1_epi8(static_cast<char>(v));
  int64_t count = 0, i = 0;
  for (; i + 32 <= n; i += 32)
    count += __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), vv))));
  for (; i < n; ++i) count += p[i] == v;
  return count;
}

Codes make_codes(const uint8_t* x, int64_t M, int64_t K, int64_t Kp, bool is_u8) {
  Codes r;
  // The one code outside [-127, 127] after the shift: q = 0 (s = 128), 255 (s = 127), s8 -128.
  uint8_t special = 0x80;
  if (is_u8) {
    const bool use_128 = count_byte(x, M * K, 0) <= count_byte(x, M * K, 255);
    r.shift = use_128 ? 128 : 127;
    special = use_128 ? 0 : 255;
  }
  r.c.assign(M * Kp, 0);
  std::vector<int64_t> count(M, 0);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(is_u8 ? 0x80 : 0));
  const __m256i low = _mm256_set1_epi8(-127);
  const __m256i one = _mm256_set1_epi8(r.shift == 127 ? 1 : 0);
  auto convert = [&](__m256i q) {  // q - s as s8, clamped into [-127, 127]
    return _mm256_max_epi8(_mm256_adds_epi8(_mm256_xor_si256(q, flip), one), low);
  };
  parallel_for(M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint8_t* row = x + m * K;
      int8_t* dst = r.c.data() + m * Kp;
      int64_t k = 0;
      for (; k + 32 <= K; k += 32)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                            convert(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k))));
      if (k < K) {
        alignas(32) uint8_t buf[32];
        std::memset(buf, 0, 32);
        std::memcpy(buf, row + k, K - k);
        alignas(32) int8_t cb[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(cb), convert(_mm256_load_si256(reinterpret_cast<const __m256i*>(buf))));
        std::memcpy(dst + k, cb, K - k);
      }
      count[m] = count_byte(row, K, special);
    }
  });
  r.first.assign(M + 1, 0);
  for (int64_t m = 0; m < M; ++m) r.first[m + 1] = r.first[m] + count[m];
  r.clamps.resize(r.first[M]);
  const int32_t delta = special == 255 ? 1 : -1;  // c - c'
  for (int64_t m = 0; m < M; ++m) {
    Clamp* out = r.clamps.data() + r.first[m];
    if (count[m])
      for (int64_t k = 0; k < K; ++k)
        if (x[m * K + k] == special) *out++ = {static_cast<int32_t>(k), delta};
  }
  return r;
}

// sum_k w[k] (the (s - zp) sum w term), the row prefetched 1 KB ahead as the GEMV's tiles do.
inline int32_t row_sum(const int8_t* w, int64_t K) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + 1024, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
  }
  int32_t s = hsum_epi32(acc);
  for (; k < K; ++k) s += w[k];
  return s;
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
