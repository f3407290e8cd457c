// AVX-512 binary / ternary / XNOR linears. No float weight is ever materialized: the sign
// bits become k-masks that select which activations are added, and the XNOR path counts
// matching bits 512 at a time (VPOPCNTDQ where the CPU has it, else a VPSHUFB nibble table).
// Tiling and the shared helpers: binary_tiles.h.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "binary_tiles.h"
#include "parallel.h"
#include "tensorslim/binary.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

// The fixed-size loops over a tile's rows carry `#pragma GCC unroll` so the accumulators
// stay in registers (-O2 would otherwise keep them on the stack).
constexpr int kRows = 4;   // weight rows per tile: 4 x 4 accumulators fit the 32 zmm registers
constexpr int kBlock = 4;  // activation rows per tile

inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

template <int R, int MB>
__attribute__((always_inline)) inline void tile_start(const Linear& p, int64_t n, int64_t m0,
                                                      const uint8_t* (&w)[R], const float* (&x)[MB],
                                                      __m512 (&acc)[R][MB]) {
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) w[r] = p.w.ptr<uint8_t>() + (n + r) * p.w.strides[0];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) x[m] = p.x.ptr<float>() + (m0 + m) * p.x.strides[0];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
}

// out = dot * scale + bias, where dot is the lane sum, or 2 * sum - rowsum[m] for binary
// weights (the sum of x over the 1 bits, turned into the +-1 dot product; where that is not
// finite, the reference's sum: binary_out_exact).
template <int R, int MB>
__attribute__((always_inline)) inline void tile_store(const Linear& p, int64_t n, int64_t m0,
                                                      const __m512 (&acc)[R][MB], const float* rowsum) {
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float s = p.scales.ptr<float>()[n + r];
    const float b = p.bias ? p.bias->ptr<float>()[n + r] : 0.0f;
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const float sum = _mm512_reduce_add_ps(acc[r][m]);
      const float dot = rowsum ? 2.0f * sum - rowsum[m0 + m] : sum;
      p.out.ptr<float>()[(m0 + m) * p.out.strides[0] + n + r] =
          rowsum && !std::isfinite(dot) ? binary_out_exact(p, n + r, m0 + m) : dot * s + b;
    }
  }
}

// ------------------------------------------------------------------- binary weights
// sum_k x * (+-1) = 2 * P - S with P = sum of x where the bit is 1 and S = sum of x:
// one masked add per 16 weights and activation row.

template <int R, int MB>
void binary_tile(const Linear& p, int64_t n, int64_t m0, const float* rowsum) {
  const int64_t K = p.K, wbytes = p.w.shape[1];
  const uint8_t* w[R];
  const float* x[MB];
  __m512 acc[R][MB];
  tile_start(p, n, m0, w, x, acc);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[MB];
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x[m] + k);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      uint16_t b;
      std::memcpy(&b, w[r] + k / 8, 2);
      const __mmask16 mk = b;
      #pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_mask_add_ps(acc[r][m], mk, acc[r][m], xv[m]);
    }
  }
  if (k < K) {  // padding bits beyond K are masked off
    const __mmask16 valid = lanes(K - k);
    __m512 xv[MB];
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(valid, x[m] + k);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __mmask16 mk = static_cast<__mmask16>(load_le(w[r] + k / 8, wbytes - k / 8, 2)) & valid;
      #pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_mask_add_ps(acc[r][m], mk, acc[r][m], xv[m]);
    }
  }
  tile_store(p, n, m0, acc, rowsum);
}

// ------------------------------------------------------------------- ternary weights
// 16 two-bit codes (4 bytes) per step: PEXT gathers the low bits ("non-zero") and the high
// bits ("negative") of the 16 codes into two 16-bit k-masks; +1 lanes are added, -1 lanes
// subtracted. (Every AVX-512 CPU has BMI2 with a fast PEXT.)

__attribute__((target("bmi2"))) inline void trit_masks(uint32_t codes, __mmask16 valid, __mmask16& pos,
                                                       __mmask16& neg) {
  const uint32_t nz = _pext_u32(codes, 0x55555555u) & valid;
  const uint32_t hi = _pext_u32(codes, 0xAAAAAAAAu);
  pos = static_cast<__mmask16>(nz & ~hi);  // 0b01
  neg = static_cast<__mmask16>(nz & hi);   // 0b11 (0b10 is not a valid code and counts as 0)
}

template <int R, int MB, bool kTail>
__attribute__((always_inline, target("bmi2"))) inline void ternary_step(
    const uint8_t* const* w, const float* const* x, int64_t k, __mmask16 valid, int64_t wbytes,
    __m512 (&acc)[R][MB]) {
  __m512 xv[MB];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    xv[m] = kTail ? _mm512_maskz_loadu_ps(valid, x[m] + k) : _mm512_loadu_ps(x[m] + k);
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    uint32_t codes;
    if (kTail)
      codes = load_le(w[r] + k / 4, wbytes - k / 4, 4);
    else
      std::memcpy(&codes, w[r] + k / 4, 4);
    __mmask16 pos, neg;
    trit_masks(codes, valid, pos, neg);
    // Decode the 16 trits once into a +1 / 0 / -1 register and FMA it with every activation
    // row (2 + MB instructions; x * t is exact, so the sum rounds as adds and subtracts
    // would). At every batch, not only from 3 rows: masked adds skip the zero trits, so a
    // NaN / Inf input there vanished at batch 1-2 only (the reference gives 0 * NaN = NaN).
    const __m512 t = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(pos, _mm512_set1_ps(1.0f)), neg,
                                        _mm512_set1_ps(-1.0f));
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(t, xv[m], acc[r][m]);
  }
}

template <int R, int MB>
__attribute__((target("bmi2"))) void ternary_tile(const Linear& p, int64_t n, int64_t m0) {
  const int64_t K = p.K, wbytes = p.w.shape[1];
  const uint8_t* w[R];
  const float* x[MB];
  __m512 acc[R][MB];
  tile_start(p, n, m0, w, x, acc);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) ternary_step<R, MB, false>(w, x, k, 0xFFFF, wbytes, acc);
  if (k < K) ternary_step<R, MB, true>(w, x, k, lanes(K - k), wbytes, acc);
  tile_store(p, n, m0, acc, nullptr);
}

// ------------------------------------------------------------------- driver

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
// Whole bytes go through 64-byte vectors (masked loads for the last one), the last partial
// byte is counted with its bits masked (binary_tiles.h).

inline __m512i popcnt_lut(__m512i v) {
  alignas(64) static const uint8_t kCounts[64] = {
      0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
      0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
  const __m512i table = _mm512_load_si512(kCounts);  // bit count of each nibble, per 128-bit lane
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low));
  const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  // per-byte counts summed into the eight 64-bit lanes
  return _mm512_sad_epu8(_mm512_add_epi8(lo, hi), _mm512_setzero_si512());
}

// The two tiles below differ only in how a 64-byte chunk's bits are counted; they are
// written out twice because the VPOPCNTDQ intrinsic may only appear inside a function
// compiled for that extension.
#define TS_XNOR_TILE_BODY(POPCOUNT)                                                         \
  const int64_t full = p.K >> 3; /* bytes whose 8 bits all count */                         \
  const uint8_t* w[R];                                                                      \
  _Pragma("GCC unroll 16")                                                                  \
  for (int r = 0; r < R; ++r) w[r] = p.w.ptr<uint8_t>() + (n + r) * p.w.strides[0];         \
  const uint8_t* a[MB];                                                                     \
  _Pragma("GCC unroll 16")                                                                  \
  for (int m = 0; m < MB; ++m) a[m] = p.a.ptr<uint8_t>() + (m0 + m) * p.a.strides[0];       \
  __m512i acc[R][MB];                                                                       \
  _Pragma("GCC unroll 16")                                                                  \
  for (int r = 0; r < R; ++r)                                                               \
    _Pragma("GCC unroll 16")                                                                \
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();                        \
  for (int64_t i = 0; i < full; i += 64) {                                                  \
    const __mmask64 valid = full - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (full - i)) - 1; \
    __m512i av[MB];                                                                         \
    _Pragma("GCC unroll 16")                                                                \
    for (int m = 0; m < MB; ++m) av[m] = _mm512_maskz_loadu_epi8(valid, a[m] + i);          \
    _Pragma("GCC unroll 16")                                                                \
    for (int r = 0; r < R; ++r) {                                                           \
      const __m512i wv = _mm512_maskz_loadu_epi8(valid, w[r] + i);                          \
      _Pragma("GCC unroll 16")                                                              \
      for (int m = 0; m < MB; ++m)                                                          \
        acc[r][m] = _mm512_add_epi64(acc[r][m], POPCOUNT(_mm512_xor_si512(av[m], wv)));     \
    }                                                                                       \
  }                                                                                         \
  int64_t mism[R][MB];                                                                      \
  _Pragma("GCC unroll 16")                                                                  \
  for (int r = 0; r < R; ++r)                                                               \
    _Pragma("GCC unroll 16")                                                                \
    for (int m = 0; m < MB; ++m) mism[r][m] = sum_lanes(acc[r][m]);                         \
  xnor_store<R, MB>(p, n, m0, mism)

// (_mm512_reduce_add_epi64 draws a false -Wuninitialized from GCC 12 under target().)
inline int64_t sum_lanes(__m512i v) {
  int64_t l[8];
  _mm512_storeu_si512(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <int R, int MB>
void xnor_tile_lut(const Xnor& p, int64_t n, int64_t m0) {
  TS_XNOR_TILE_BODY(popcnt_lut);
}

template <int R, int MB>
__attribute__((target("avx512vpopcntdq"))) void xnor_tile_vpop(const Xnor& p, int64_t n, int64_t m0) {
  TS_XNOR_TILE_BODY(_mm512_popcnt_epi64);
}

#undef TS_XNOR_TILE_BODY

template <bool kVpop, int R, int MB>
inline void xnor_tile(const Xnor& p, int64_t n, int64_t m0) {
  if constexpr (kVpop)
    xnor_tile_vpop<R, MB>(p, n, m0);
  else
    xnor_tile_lut<R, MB>(p, n, m0);
}

template <bool kVpop>
struct XnorTiles {
  template <int R, int MB>
  struct Tile {
    static void run(const Xnor& p, int64_t n, int64_t m0) { xnor_tile<kVpop, R, MB>(p, n, m0); }
  };
};

std::atomic<bool>& vpop_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

}  // namespace

bool has_vpopcntdq() {
  static const bool cpu_has = __builtin_cpu_supports("avx512vpopcntdq");
  return cpu_has && vpop_enabled().load();
}

void set_vpopcntdq_enabled(bool enabled) { vpop_enabled().store(enabled); }

bool linear_binary_avx512(const TensorView& x, const TensorView& bits, const TensorView& scales,
                          const TensorView* bias, const TensorView& out) {
  if (active_isa() != Isa::kAVX512) return false;
  const int64_t M = x.shape[0], K = x.shape[1];
  // Row sums of x (the "S" of 2P - S), in the same 16-lane order as the tiles.
  thread_local std::vector<float> rowsum;
  rowsum.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x.ptr<float>() + m * x.strides[0];
    __m512 s = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xr + k));
    if (k < K) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(lanes(K - k), xr + k));
    rowsum[m] = _mm512_reduce_add_ps(s);
  }
  const Linear p{x, bits, scales, bias, out, K};
  run_tiles<kRows, kBlock, BinaryTile>(p, M, bits.shape[0], static_cast<const float*>(rowsum.data()));
  return true;
}

bool linear_ternary_avx512(const TensorView& x, const TensorView& codes,
                           const TensorView& scales, const TensorView* bias,
                           const TensorView& out) {
  static const bool has_bmi2 = __builtin_cpu_supports("bmi2");
  if (active_isa() != Isa::kAVX512 || !has_bmi2) return false;
  const Linear p{x, codes, scales, bias, out, x.shape[1]};
  run_tiles<kRows, kBlock, TernaryTile>(p, x.shape[0], codes.shape[0]);
  return true;
}

bool xnor_dots_avx512(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                      const TensorView& dots) {
  if (active_isa() != Isa::kAVX512) return false;
  const Xnor p{a_bits, w_bits, dots, K};
  const int64_t M = a_bits.shape[0], N = w_bits.shape[0];
  if (has_vpopcntdq())
    run_tiles<kRows, kBlock, XnorTiles<true>::Tile>(p, M, N);
  else
    run_tiles<kRows, kBlock, XnorTiles<false>::Tile>(p, M, N);
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
