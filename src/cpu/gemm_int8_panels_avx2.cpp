// Exact INT8 GEMM for many activation rows on AVX2 CPUs without VNNI (compiled with
// -mavx2 -mfma): the GEMV's arithmetic (gemm_int8_avx2.cpp: vpmaddubsw(|w|, sign(c, w)) with
// codes c in [-127, 127], exact) in a GEMM layout. The weight is packed once per call into
// panels of 8 output columns x 4 k (32 bytes: column j's 4 values at bytes 4j..4j+3), so one
// vector product adds 4 k into 8 outputs and no horizontal sums are left; each activation row
// reads 4 codes per step as one broadcast. Register tiles of 4 rows x 16 columns.
// Activation codes, their shift and the exact corrections: int8_codes_avx2.h. The rescale is
// the reference's expression in its order.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tensorslim/gemm_int8.h"
#include "int8_codes_avx2.h"
#include "tensorslim/quantize.h"
#include "transpose8_avx2.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMR = 4;    // activation rows per register tile
constexpr int kNR = 16;   // output columns per register tile (two 8-column panels)
constexpr int64_t kRowBlock = 64;  // activation rows per task

// Panels of 8 weight rows: [N8][Kq][8 columns][4 k], zero past N and K. Whole panels move
// 32 k at a time as an 8 x 8 transpose of 4-byte units.
void pack_weight(const int8_t* w, int64_t N, int64_t K, int64_t Kq, int8_t* dst, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int8_t* panel = dst + p * Kq * 32;
    int64_t k0 = 0;
    if (p * 8 + 8 <= N) {
      for (; k0 + 32 <= K; k0 += 32) {
        __m256i v[8];
        for (int j = 0; j < 8; ++j)
          v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (p * 8 + j) * K + k0));
        transpose8(v);
        for (int q = 0; q < 8; ++q)
          _mm256_store_si256(reinterpret_cast<__m256i*>(panel + (k0 / 4 + q) * 32), v[q]);
      }
    }
    std::memset(panel + (k0 / 4) * 32, 0, (Kq - k0 / 4) * 32);
    for (int j = 0; j < 8; ++j) {
      const int64_t n = p * 8 + j;
      if (n >= N) break;
      const int8_t* row = w + n * K;
      for (int64_t k = k0; k < K; ++k) panel[(k >> 2) * 32 + j * 4 + (k & 3)] = row[k];
    }
  }
}

// acc[r][h] (8 columns each) = sum over k of c'[r] x panel h, for MR rows and NP panels.
template <int MR, int NP>
void tile(const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t Kq,
          int32_t* acc_out /* [MR][16] */) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < NP; ++h) acc[r][h] = _mm256_setzero_si256();
  for (int64_t q = 0; q < Kq; ++q) {
    __m256i w[NP], wabs[NP];
    w[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b0 + q * 32));
    if (NP == 2) w[NP - 1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b1 + q * 32));
    for (int h = 0; h < NP; ++h) wabs[h] = _mm256_abs_epi8(w[h]);  // -128 -> 128 as unsigned
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * lda + q * 4, 4);
      const __m256i c = _mm256_set1_epi32(four);
      for (int h = 0; h < NP; ++h) {
        const __m256i pairs = _mm256_maddubs_epi16(wabs[h], _mm256_sign_epi8(c, w[h]));
        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < NP; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + r * 16 + h * 8), acc[r][h]);
}

template <int NP>
void tile_rows(int mr, const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t Kq,
               int32_t* acc) {
  switch (mr) {
    case 1: return tile<1, NP>(a, lda, b0, b1, Kq, acc);
    case 2: return tile<2, NP>(a, lda, b0, b1, Kq, acc);
    case 3: return tile<3, NP>(a, lda, b0, b1, Kq, acc);
    default: return tile<4, NP>(a, lda, b0, b1, Kq, acc);
  }
}

}  // namespace

bool linear_int8_panels_avx2(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                             const TensorView& qweight, const TensorView& w_scales,
                             const TensorView* bias, const TensorView& out) {
  if (active_isa() < Isa::kAVX2) return false;
  const int64_t M = qx.shape[0], K = qx.shape[1], N = qweight.shape[0];
  const bool is_u8 = qx.dtype == DType::kUInt8;
  const bool per_token = act_scales.shape[0] == M && M != 1;
  const int8_t* wq = qweight.ptr<int8_t>();
  const float* as = act_scales.ptr<float>();
  const float* ws = w_scales.ptr<float>();
  const float* b = bias ? bias->ptr<float>() : nullptr;
  float* y = out.ptr<float>();
  const int64_t Kq = (K + 3) / 4, Kp = Kq * 4;
  const int64_t N8 = (N + 7) / 8;

  const Codes codes = make_codes(qx.ptr<uint8_t>(), M, K, Kp, is_u8);
  const int32_t shift_back = is_u8 ? codes.shift - act_zero_point : 0;
  struct alignas(32) Block { int8_t v[32]; };
  std::vector<Block> packed(N8 * Kq);
  int8_t* panels = packed.front().v;
  std::vector<int32_t> wsum(N8 * 8, 0);
  parallel_for(N8, std::max<int64_t>(1, 4096 / std::max<int64_t>(Kq, 1)), [&](int64_t p0, int64_t p1) {
    pack_weight(wq, N, K, Kq, panels, p0, p1);
    if (shift_back)
      for (int64_t n = p0 * 8; n < std::min(N, p1 * 8); ++n) {
        wsum[n] = row_sum(wq + n * K, K);
      }
  });

  const int64_t col_tiles = (N + kNR - 1) / kNR;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  parallel_for(col_tiles * row_blocks, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) int32_t acc[kMR * 16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ct = t % col_tiles, rb = t / col_tiles;
      const int64_t n0 = ct * kNR, nr = std::min<int64_t>(kNR, N - n0);
      const int8_t* b0 = panels + (n0 / 8) * Kq * 32;
      const int8_t* b1 = b0 + Kq * 32;
      for (int64_t m0 = rb * kRowBlock; m0 < std::min(M, (rb + 1) * kRowBlock); m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        const int8_t* a = codes.c.data() + m0 * Kp;
        if (nr > 8)
          tile_rows<2>(mr, a, Kp, b0, b1, Kq, acc);
        else
          tile_rows<1>(mr, a, Kp, b0, b1, Kq, acc);
        for (int r = 0; r < mr; ++r) {
          const int64_t m = m0 + r;
          int32_t* accr = acc + r * 16;
          for (int64_t i = codes.first[m]; i < codes.first[m + 1]; ++i) {  // rare
            const Clamp& cl = codes.clamps[i];
            for (int64_t j = 0; j < nr; ++j) accr[j] += cl.delta * wq[(n0 + j) * K + cl.k];
          }
          const float a_s = as[per_token ? m : 0];
          float* yr = y + m * N + n0;
          for (int64_t j = 0; j < nr; ++j) {
            const int32_t v = accr[j] + shift_back * wsum[n0 + j];
            float o = static_cast<float>(v) * (a_s * ws[n0 + j]);
            if (b) o += b[n0 + j];
            yr[j] = o;
          }
        }
      }
    }
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
