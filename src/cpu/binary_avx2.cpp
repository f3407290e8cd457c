// AVX2 binary / ternary / XNOR linears, the twins of binary_avx512.cpp (tiling and shared
// helpers: binary_tiles.h). No float weight is materialized in memory: a weight byte's 8
// sign bits index a table of lane masks (8 KiB) that select which activations are added,
// 8 ternary codes become +1 / 0 / -1 by one permute, and the XNOR path counts mismatching
// bits 256 at a time with a VPSHUFB nibble table.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "binary_tiles.h"
#include "hsum_avx2.h"
#include "tensorslim/binary.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

// 4 weight rows x 2 activation rows: 8 accumulators, 2 activations and the step's
// temporaries fit the 16 ymm registers.
constexpr int kRows = 4;
constexpr int kBlock = 2;

// kMasks.m[b][j]: all ones where bit j of b is set (binary weight +1).
struct MaskTable {
  alignas(32) int32_t m[256][8] = {};
  constexpr MaskTable() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) m[b][j] = (b >> j) & 1 ? -1 : 0;
  }
};
constexpr MaskTable kMasks{};

// All-ones in the first `left` lanes (all 8 when left >= 8).
inline __m256i tail_mask(int64_t left) {
  const int l = left >= 8 ? 8 : static_cast<int>(left);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(l), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// A tile's R weight rows from n, MB activation rows from m0, and zeroed accumulators.
template <int R, int MB>
inline void tile_start(const Linear& p, int64_t n, int64_t m0, const uint8_t* (&w)[R],
                       const float* (&x)[MB], __m256 (&acc)[R][MB]) {
  for (int r = 0; r < R; ++r) w[r] = p.w.ptr<uint8_t>() + (n + r) * p.w.strides[0];
  for (int m = 0; m < MB; ++m) x[m] = p.x.ptr<float>() + (m0 + m) * p.x.strides[0];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
}

// out = dot * scale + bias, where dot is the lane sum, or 2 * sum - rowsum[m] for binary
// weights (the sum of x over the 1 bits, turned into the +-1 dot product; where that is not
// finite, the reference's sum: binary_out_exact).
template <int R, int MB>
inline void tile_store(const Linear& p, int64_t n, int64_t m0, const __m256 (&acc)[R][MB],
                       const float* rowsum) {
  for (int r = 0; r < R; ++r) {
    const float s = p.scales.ptr<float>()[n + r];
    const float b = p.bias ? p.bias->ptr<float>()[n + r] : 0.0f;
    for (int m = 0; m < MB; ++m) {
      const float sum = hsum_ps(acc[r][m]);
      const float dot = rowsum ? 2.0f * sum - rowsum[m0 + m] : sum;
      p.out.ptr<float>()[(m0 + m) * p.out.strides[0] + n + r] =
          rowsum && !std::isfinite(dot) ? binary_out_exact(p, n + r, m0 + m) : dot * s + b;
    }
  }
}

// ------------------------------------------------------------------- binary weights
// sum_k x * (+-1) = 2 * P - S with P = sum of x where the bit is 1 and S = sum of x: one
// AND and one add per 8 weights and activation row.

template <int R, int MB, bool kTail>
inline void binary_step(const uint8_t* const* w, const float* const* x, int64_t k, __m256i valid,
                        __m256 (&acc)[R][MB]) {
  __m256 xv[MB];
  for (int m = 0; m < MB; ++m)  // the tail's lanes past K load as 0: their bits never count
    xv[m] = kTail ? _mm256_maskload_ps(x[m] + k, valid) : _mm256_loadu_ps(x[m] + k);
  for (int r = 0; r < R; ++r) {
    const __m256 mk = _mm256_load_ps(reinterpret_cast<const float*>(kMasks.m[w[r][k >> 3]]));
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_add_ps(acc[r][m], _mm256_and_ps(mk, xv[m]));
  }
}

template <int R, int MB>
void binary_tile(const Linear& p, int64_t n, int64_t m0, const float* rowsum) {
  const int64_t K = p.K;
  const uint8_t* w[R];
  const float* x[MB];
  __m256 acc[R][MB];
  tile_start(p, n, m0, w, x, acc);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) binary_step<R, MB, false>(w, x, k, _mm256_setzero_si256(), acc);
  if (k < K) binary_step<R, MB, true>(w, x, k, tail_mask(K - k), acc);  // byte k/8 exists
  tile_store(p, n, m0, acc, rowsum);
}

// ------------------------------------------------------------------- ternary weights
// 8 two-bit codes (2 bytes) per step: a variable shift puts code j in lane j and a permute
// of {0, +1, 0, -1} turns it into the trit (0b10 is not a valid code and counts as 0); an
// FMA with every activation row follows (x * t is exact, so it rounds as an add / sub).
// (A byte -> 4 trits table was slower at batch 1: two scalar loads per step.)

template <int R, int MB, bool kTail>
inline void ternary_step(const uint8_t* const* w, const float* const* x, int64_t k, __m256i valid,
                         int64_t wbytes, __m256 (&acc)[R][MB]) {
  const __m256 trit = _mm256_setr_ps(0.0f, 1.0f, 0.0f, -1.0f, 0.0f, 1.0f, 0.0f, -1.0f);
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  __m256 xv[MB];
  for (int m = 0; m < MB; ++m)  // the tail's lanes past K load as 0
    xv[m] = kTail ? _mm256_maskload_ps(x[m] + k, valid) : _mm256_loadu_ps(x[m] + k);
  for (int r = 0; r < R; ++r) {
    uint16_t codes;
    if (kTail)
      codes = static_cast<uint16_t>(load_le(w[r] + k / 4, wbytes - k / 4, 2));
    else
      std::memcpy(&codes, w[r] + k / 4, 2);
    // the permute reads bits 0-2 of each lane; bit 2 (the next code's) is don't-care
    // because the table repeats after 4 entries
    const __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(codes), shifts);
    __m256 t = _mm256_permutevar8x32_ps(trit, c);
    if (kTail) t = _mm256_and_ps(t, _mm256_castsi256_ps(valid));  // padding codes count as 0
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(t, xv[m], acc[r][m]);
  }
}

template <int R, int MB>
void ternary_tile(const Linear& p, int64_t n, int64_t m0) {
  const int64_t K = p.K, wbytes = p.w.shape[1];
  const uint8_t* w[R];
  const float* x[MB];
  __m256 acc[R][MB];
  tile_start(p, n, m0, w, x, acc);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) ternary_step<R, MB, false>(w, x, k, _mm256_setzero_si256(), wbytes, acc);
  if (k < K) ternary_step<R, MB, true>(w, x, k, tail_mask(K - k), wbytes, acc);
  tile_store(p, n, m0, acc, nullptr);
}

template <int R, int MB>
struct BinaryTile {
  static void run(const Linear& p, int64_t n, int64_t m0, const float* rowsum) {
    binary_tile<R, MB>(p, n, m0, rowsum);
  }
};

template <int R, int MB>
struct TernaryTile {
  static void run(const Linear& p, int64_t n, int64_t m0) { ternary_tile<R, MB>(p, n, m0); }
};

// ------------------------------------------------------------------- XNOR popcount
// Whole bytes 32 at a time (the last chunk copied into a zeroed buffer), the last partial
// byte counted with its bits masked (binary_tiles.h).

// Bit counts of v's bytes, summed into its four 64-bit lanes.
inline __m256i popcnt_lut(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
  const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

inline int64_t sum_lanes(__m256i v) {
  alignas(32) int64_t l[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
  return (l[0] + l[1]) + (l[2] + l[3]);
}

// 32 bytes from p, or the `left` (< 32) that remain followed by zeros.
inline __m256i load_bytes(const uint8_t* p, int64_t left) {
  if (left >= 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) uint8_t tmp[32] = {};
  std::memcpy(tmp, p, static_cast<size_t>(left));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
}

template <int R, int MB>
void xnor_tile(const Xnor& p, int64_t n, int64_t m0) {
  const int64_t full = p.K >> 3;  // bytes whose 8 bits all count
  const uint8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w.ptr<uint8_t>() + (n + r) * p.w.strides[0];
  const uint8_t* a[MB];
  for (int m = 0; m < MB; ++m) a[m] = p.a.ptr<uint8_t>() + (m0 + m) * p.a.strides[0];
  __m256i acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
  for (int64_t i = 0; i < full; i += 32) {
    __m256i av[MB];
    for (int m = 0; m < MB; ++m) av[m] = load_bytes(a[m] + i, full - i);
    for (int r = 0; r < R; ++r) {
      const __m256i wv = load_bytes(w[r] + i, full - i);
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm256_add_epi64(acc[r][m], popcnt_lut(_mm256_xor_si256(av[m], wv)));
    }
  }
  int64_t mism[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) mism[r][m] = sum_lanes(acc[r][m]);
  xnor_store<R, MB>(p, n, m0, mism);
}

template <int R, int MB>
struct XnorTile {
  static void run(const Xnor& p, int64_t n, int64_t m0) { xnor_tile<R, MB>(p, n, m0); }
};

}  // namespace

bool linear_binary_avx2(const TensorView& x, const TensorView& bits, const TensorView& scales,
                        const TensorView* bias, const TensorView& out) {
  if (active_isa() < Isa::kAVX2) return false;
  const int64_t M = x.shape[0], K = x.shape[1];
  // Row sums of x (the "S" of 2P - S), in the same 8-lane order as the tiles.
  thread_local std::vector<float> rowsum;
  rowsum.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x.ptr<float>() + m * x.strides[0];
    __m256 s = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + k));
    if (k < K) s = _mm256_add_ps(s, _mm256_maskload_ps(xr + k, tail_mask(K - k)));
    rowsum[m] = hsum_ps(s);
  }
  const Linear p{x, bits, scales, bias, out, K};
  run_tiles<kRows, kBlock, BinaryTile>(p, M, bits.shape[0], static_cast<const float*>(rowsum.data()));
  return true;
}

bool linear_ternary_avx2(const TensorView& x, const TensorView& codes, const TensorView& scales,
                         const TensorView* bias, const TensorView& out) {
  if (active_isa() < Isa::kAVX2) return false;
  const Linear p{x, codes, scales, bias, out, x.shape[1]};
  run_tiles<kRows, kBlock, TernaryTile>(p, x.shape[0], codes.shape[0]);
  return true;
}

bool xnor_dots_avx2(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                    const TensorView& dots) {
  if (active_isa() < Isa::kAVX2) return false;
  const Xnor p{a_bits, w_bits, dots, K};
  run_tiles<kRows, kBlock, XnorTile>(p, a_bits.shape[0], w_bits.shape[0]);
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
