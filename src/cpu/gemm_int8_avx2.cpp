// Exact INT8 GEMM on AVX2 CPUs without VNNI (compiled with -mavx2 -mfma).
//
// Without VNNI every x86 u8 x s8 product goes through vpmaddubsw, which adds two products
// into a saturating int16: 255*127 + 255*127 overflows, and that is where oneDNN's AVX2
// kernels lose up to half the result. Here both factors of vpmaddubsw stay below that:
//   c = activation code as s8 (u8 codes: q - 128 or q - 127), clamped to [-127, 127]
//   vpmaddubsw(|w|, sign(c, w)):  |w| <= 128, |sign(c, w)| <= 127, so a pair sums to at
//   most 2 * 128 * 127 = 32512 < 32767: exact for every int8 weight, -128 included.
// Then vpmaddwd with ones widens to int32. The codes, the shift they were given and the exact
// corrections for the few clamped ones come from int8_codes_avx2.h (shared with the GEMM for
// 16+ rows, gemm_int8_panels_avx2.cpp). The rescale is the reference's expression in the same
// order, so results are bit-exact.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemv_column_blocks.h"
#include "int8_codes_avx2.h"
#include "parallel.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMaxRows = 4;  // activation rows per register tile
constexpr int kMaxCols = 2;  // weight rows (output columns) per register tile

// One 32-byte step of tile(): weights at kw, codes at ka. The accumulators come by reference to
// an inlined function, not captured by a lambda: captured, GCC kept them in memory (a store per
// accumulator per step).
template <int MR, int NR>
__attribute__((always_inline)) inline void tile_step(__m256i (&acc)[MR * NR], const int8_t* const* a,
                                                     const int8_t* const* wp, int64_t kw, int64_t ka,
                                                     __m256i ones) {
  __m256i wv[NR], wabs[NR];
  for (int j = 0; j < NR; ++j) {
    // Rows of K = 4096 are one page each, where the hardware prefetchers stop and restart:
    // asking 1 KB ahead keeps the stream going (4096 x 4096 batch 1 on Zen 3, A/B: dynamic
    // 1.20-1.83 -> 1.10-1.29 ms).
    _mm_prefetch(reinterpret_cast<const char*>(wp[j] + kw) + 1024, _MM_HINT_T0);
    wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[j] + kw));
    wabs[j] = _mm256_abs_epi8(wv[j]);  // -128 -> 0x80, read as unsigned 128
  }
  for (int r = 0; r < MR; ++r) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + ka));
    for (int j = 0; j < NR; ++j) {
      const __m256i pairs = _mm256_maddubs_epi16(wabs[j], _mm256_sign_epi8(c, wv[j]));
      acc[r * NR + j] = _mm256_add_epi32(acc[r * NR + j], _mm256_madd_epi16(pairs, ones));
    }
  }
}

// acc[r][j] = sum_k c'[r][k] * w[j][k] over K, for an MR x NR tile. The codes are padded
// with zeros to a multiple of 32; the weights' K tail is copied into zero-padded buffers.
template <int MR, int NR>
void tile(const int8_t* const* a, const int8_t* const* w, int64_t K, int32_t acc_out[kMaxRows][kMaxCols]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR * NR];
  for (int i = 0; i < MR * NR; ++i) acc[i] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) tile_step<MR, NR>(acc, a, w, k, k, ones);
  if (k < K) {
    alignas(32) int8_t wbuf[NR][32];
    const int8_t* wp[NR];
    for (int j = 0; j < NR; ++j) {
      std::memset(wbuf[j], 0, 32);
      std::memcpy(wbuf[j], w[j] + k, K - k);
      wp[j] = wbuf[j];
    }
    tile_step<MR, NR>(acc, a, wp, 0, k, ones);
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc_out[r][j] = hsum_epi32(acc[r * NR + j]);
}

template <int NR>
void tile_rows(int mr, const int8_t* const* a, const int8_t* const* w, int64_t K,
               int32_t acc[kMaxRows][kMaxCols]) {
  switch (mr) {
    case 1: return tile<1, NR>(a, w, K, acc);
    case 2: return tile<2, NR>(a, w, K, acc);
    case 3: return tile<3, NR>(a, w, K, acc);
    default: return tile<4, NR>(a, w, K, acc);
  }
}

}  // namespace

bool linear_int8_avx2(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                      const TensorView& qweight, const TensorView& w_scales,
                      const TensorView* bias, const TensorView& out) {
  if (active_isa() < Isa::kAVX2) return false;
  const int64_t M = qx.shape[0], K = qx.shape[1], N = qweight.shape[0];
  // With vpdpbusd the panels, packed per call, also beat this GEMV on large weights from 32
  // rows (4096 x 4096, 4096 x 11008, 11008 x 4096, EVEX form on Zen 4: 2.1-2.8x at 32 rows,
  // 2.7-3.2x at 64; alike at 16).
  const bool vnni_large = avx2_vnni() != AvxVnni::kNone && M >= 32;
  if ((K * N < kInt8LargeWeight || vnni_large) && M >= kInt8PanelMinRows)
    return linear_int8_panels_avx2(qx, act_scales, act_zero_point, qweight, w_scales, bias, out);
  const bool is_u8 = qx.dtype == DType::kUInt8;
  const bool per_token = act_scales.shape[0] == M && M != 1;
  const int8_t* wq = qweight.ptr<int8_t>();
  const float* as = act_scales.ptr<float>();
  const float* ws = w_scales.ptr<float>();
  const float* b = bias ? bias->ptr<float>() : nullptr;
  const int64_t Kp = (K + 31) / 32 * 32;  // whole 32-byte steps of codes, zero-padded
  const Codes codes = make_codes(qx.ptr<uint8_t>(), M, K, Kp, is_u8);
  const int32_t shift_back = is_u8 ? codes.shift - act_zero_point : 0;
  for_each_column_block(N, M, K, [&](int64_t n0, int64_t n1) {
    int32_t wsum[kGemvColumnBlock];
    for (int64_t n = n0; n < n1; ++n)
      wsum[n - n0] = shift_back ? row_sum(wq + n * K, K) : 0;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
      const int8_t* a[kMaxRows];
      for (int r = 0; r < mr; ++r) a[r] = codes.c.data() + (m0 + r) * Kp;
      for (int64_t n = n0; n < n1; n += kMaxCols) {
        const int nr = static_cast<int>(std::min<int64_t>(kMaxCols, n1 - n));
        const int8_t* w[kMaxCols] = {wq + n * K, wq + (n + nr - 1) * K};
        int32_t acc[kMaxRows][kMaxCols];
        if (nr == 2)
          tile_rows<2>(mr, a, w, K, acc);
        else
          tile_rows<1>(mr, a, w, K, acc);
        for (int r = 0; r < mr; ++r) {
          const int64_t m = m0 + r;
          const float a_s = as[per_token ? m : 0];
          for (int j = 0; j < nr; ++j) {
            int32_t v = acc[r][j] + shift_back * wsum[n + j - n0];
            for (int64_t i = codes.first[m]; i < codes.first[m + 1]; ++i)  // rare
              v += codes.clamps[i].delta * wq[(n + j) * K + codes.clamps[i].k];
            float y = static_cast<float>(v) * (a_s * ws[n + j]);
            if (b) y += b[n + j];
            out.ptr<float>()[m * N + n + j] = y;
          }
        }
      }
    }
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
