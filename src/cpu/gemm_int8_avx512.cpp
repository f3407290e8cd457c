// Exact INT8 GEMM for a few activation rows on AVX-512 VNNI CPUs (this file is compiled with
// -mavx512f/bw/vl/dq; VNNI is enabled per function and checked at run time).
//
// Why not oneDNN here: at 1-16 rows its AMX/VNNI kernels read the weight at a fraction of
// the memory bandwidth (4096 x 4096, 1 row, Sapphire Rapids, 2 threads: 3.0-3.2 ms against
// 1.4 ms for our AVX2 GEMV, which this kernel replaces on VNNI CPUs).
//
// vpdpbusd adds four u8 x s8 products to an int32 lane without saturating, so u8 codes q
// (zero point zp) go in as they are and sum (q - zp) w = sum q w - zp sum w, exact in int32
// like the reference. s8 codes become q + 128 (an xor of the sign bit) with zp 128. The
// weight row sums come from the same loads (vpdpbusd with a vector of ones). The rescale is
// the reference's expression in its order, so results are bit-exact.
#include <immintrin.h>

#include <algorithm>

#include "parallel.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMaxRows = 4;  // activation rows per register tile
constexpr int kCols = 4;     // weight rows per register tile

inline __mmask64 tail_mask(int64_t n) { return n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1; }

// acc[r][j] = sum_k a[r][k] * w[j][k] (a as u8) and, with kSums, wsum[j] = sum_k w[j][k].
template <int MR, int NR, bool kSums>
__attribute__((target("avx512vnni"))) void tile(const uint8_t* const* a, const int8_t* const* w,
                                                int64_t K, __m512i flip,
                                                int32_t acc_out[kMaxRows][kCols], int32_t* wsum) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[MR][NR], sums[NR];
  for (int j = 0; j < NR; ++j) {
    sums[j] = _mm512_setzero_si512();
    for (int r = 0; r < MR; ++r) acc[r][j] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = tail_mask(K - k);  // zero bytes past K add nothing
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j) {
      // Rows of K = 4096 are a page each, where the hardware prefetchers stop and restart.
      _mm_prefetch(reinterpret_cast<const char*>(w[j] + k) + 1024, _MM_HINT_T0);
      wv[j] = _mm512_maskz_loadu_epi8(mask, w[j] + k);
      if (kSums) sums[j] = _mm512_dpbusd_epi32(sums[j], ones, wv[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512i c = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a[r] + k), flip);
      const __m512i cm = _mm512_maskz_mov_epi8(mask, c);  // s8 codes: the flipped tail is 0x80
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], cm, wv[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc_out[r][j] = _mm512_reduce_add_epi32(acc[r][j]);
  if (kSums)
    for (int j = 0; j < NR; ++j) wsum[j] = _mm512_reduce_add_epi32(sums[j]);
}

template <int NR, bool kSums>
void tile_rows(int mr, const uint8_t* const* a, const int8_t* const* w, int64_t K, __m512i flip,
               int32_t acc[kMaxRows][kCols], int32_t* wsum) {
  switch (mr) {
    case 1: return tile<1, NR, kSums>(a, w, K, flip, acc, wsum);
    case 2: return tile<2, NR, kSums>(a, w, K, flip, acc, wsum);
    case 3: return tile<3, NR, kSums>(a, w, K, flip, acc, wsum);
    default: return tile<4, NR, kSums>(a, w, K, flip, acc, wsum);
  }
}

template <bool kSums>
void tile_any(int mr, int nr, const uint8_t* const* a, const int8_t* const* w, int64_t K,
              __m512i flip, int32_t acc[kMaxRows][kCols], int32_t* wsum) {
  switch (nr) {
    case 1: return tile_rows<1, kSums>(mr, a, w, K, flip, acc, wsum);
    case 2: return tile_rows<2, kSums>(mr, a, w, K, flip, acc, wsum);
    case 3: return tile_rows<3, kSums>(mr, a, w, K, flip, acc, wsum);
    default: return tile_rows<4, kSums>(mr, a, w, K, flip, acc, wsum);
  }
}

}  // namespace

bool int8_vnni_available() {
  static const bool cpu_has = __builtin_cpu_supports("avx512vnni");
  return cpu_has && active_isa() == Isa::kAVX512;
}

bool linear_int8_vnni(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                      const TensorView& qweight, const TensorView& w_scales,
                      const TensorView* bias, const TensorView& out) {
  if (!int8_vnni_available()) return false;
  const int64_t M = qx.shape[0], K = qx.shape[1], N = qweight.shape[0];
  const bool is_u8 = qx.dtype == DType::kUInt8;
  const bool per_token = act_scales.shape[0] == M && M != 1;
  const uint8_t* xq = qx.ptr<uint8_t>();
  const int8_t* wq = qweight.ptr<int8_t>();
  const float* as = act_scales.ptr<float>();
  const float* ws = w_scales.ptr<float>();
  const float* b = bias ? bias->ptr<float>() : nullptr;
  float* y = out.ptr<float>();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(is_u8 ? 0 : 0x80));
  const int32_t zp = is_u8 ? act_zero_point : 128;
  // Blocks of 16 weight rows per task, as the AVX2 GEMV: all activation rows run over a
  // block while it sits in L2, and a GEMV still spreads over the threads.
  const int64_t col_block = 16;
  const int64_t blocks = (N + col_block - 1) / col_block;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, M * K * col_block));
  parallel_for(blocks, grain, [&](int64_t bb, int64_t be) {
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t n0 = blk * col_block, n1 = std::min(N, n0 + col_block);
      for (int64_t n = n0; n < n1; n += kCols) {
        const int nr = static_cast<int>(std::min<int64_t>(kCols, n1 - n));
        const int8_t* w[kCols];
        for (int j = 0; j < kCols; ++j) w[j] = wq + (n + std::min(j, nr - 1)) * K;
        int32_t wsum[kCols] = {0, 0, 0, 0};
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
          const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
          const uint8_t* a[kMaxRows];
          for (int r = 0; r < mr; ++r) a[r] = xq + (m0 + r) * K;
          int32_t acc[kMaxRows][kCols];
          if (m0 == 0)
            tile_any<true>(mr, nr, a, w, K, flip, acc, wsum);
          else
            tile_any<false>(mr, nr, a, w, K, flip, acc, wsum);
          for (int r = 0; r < mr; ++r) {
            const int64_t m = m0 + r;
            const float a_s = as[per_token ? m : 0];
            for (int j = 0; j < nr; ++j) {
              const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(acc[r][j]) -
                                                     static_cast<uint32_t>(zp) *
                                                         static_cast<uint32_t>(wsum[j]));
              float yv = static_cast<float>(v) * (a_s * ws[n + j]);
              if (b) yv += b[n + j];
              y[m * N + n + j] = yv;
            }
          }
        }
      }
    }
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
