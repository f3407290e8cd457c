// Native AVX-512 weight-only GEMV/GEMM for a few rows of activations (M <= 8): each
// weight row is read once from memory, dequantized in registers and multiplied with
// every activation row. Memory-bound at batch 1, so INT4 moves 1/8 of fp32's bytes.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"
#include "weight_only_native.h"
#include "weight_only_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

// The 16 values a nibble decodes to, minus the zero point: vpermps looks a float up by the low
// 4 bits of each dword, so a nibble needs no mask, sign extension or int-to-float conversion.
template <bool kSigned>
inline __m512 int4_table(int32_t zp) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  if (kSigned) return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  return _mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(zp)));
}

// 32 values from 16 bytes: low nibbles (even k) in lo, high nibbles (odd k) in hi.
inline void int4_block(const uint8_t* w, __m512 table, __m512& lo, __m512& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  lo = _mm512_permutexvar_ps(b, table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}

// Values per vector chunk: a 32-value INT4 block, or one register of INT8 codes.
template <int kBits>
constexpr int64_t kStep() { return kBits == 4 ? 32 : 16; }

// Adds the scalar tail of group g (see weight_only_tail_sums) to lane 0 of part.
template <int R, int MB, int kBits, bool kSigned>
void weight_only_tail(const uint8_t* const* wrow, const uint8_t* const* zrow, int64_t g, int64_t K,
                      int64_t k0, int64_t kend, const float* xp, __m512 part[R][MB]) {
  float t[R][MB];
  weight_only_tail_sums<R, MB, kBits, kSigned>(wrow, zrow, g, K, k0, kend, xp, t);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      part[r][m] = _mm512_add_ps(part[r][m], _mm512_maskz_mov_ps(1, _mm512_set1_ps(t[r][m])));
}

// acc[r][m] (16 lanes) = sum over groups of scale[r][g] * sum_k w[r][k] * x[m][k] for R
// weight rows at once: R * MB independent FMA chains hide the FMA latency, and R
// weight streams keep more memory requests in flight.
template <int R, int MB, int kBits, bool kSigned>
void rows_dot(const uint8_t* const* wrow, const float* const* sc, const uint8_t* const* zrow,
              int64_t K, int64_t gsize, const float* xp, __m512 acc[R][MB]) {
  const int64_t groups = num_groups(K, gsize);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  // The next R rows (they follow these in memory) go to L2 as one linear stream, a line per
  // step of R x 16 bytes: R short streams alone leave memory idle between pages.
  const char* next = reinterpret_cast<const char*>(wrow[R - 1] + (R > 1 ? wrow[R - 1] - wrow[R - 2] : 0));
  // Groups of 64 values or fewer: the next R rows' scales as one stream too (R short scale
  // streams went unprefetched: weights from memory, Zen 5, 11008 x 4096 g32 batch 1).
  const char* next_scales = reinterpret_cast<const char*>(sc[R - 1] + groups);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[R][MB];
    if (gsize <= 64) _mm_prefetch(next_scales + g * 4 * R, _MM_HINT_T1);
    __m512i zp[R];
    __m512 table[R];
    for (int r = 0; r < R; ++r) {
      zp[r] = _mm512_set1_epi32(zrow[r] ? zrow[r][g] : 0);
      if (kBits == 4) table[r] = int4_table<kSigned>(zrow[r] ? zrow[r][g] : 0);
      for (int m = 0; m < MB; ++m) part[r][m] = _mm512_setzero_ps();
    }
    const int64_t k0 = g * gsize, kend = std::min(k0 + gsize, K);
    const int64_t kvec = k0 + (kend - k0) / kStep<kBits>() * kStep<kBits>();  // vector chunks end here
    if (kBits == 4) {
      for (int64_t k = k0; k < kvec; k += 32) {
        if (R > 1) _mm_prefetch(next + k / 2 * R, _MM_HINT_T1);
        for (int r = 0; r < R; ++r) {
          __m512 lo, hi;
          int4_block(wrow[r] + k / 2, table[r], lo, hi);
          for (int m = 0; m < MB; ++m) {
            part[r][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * K + k), part[r][m]);
            part[r][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * K + k + 16), part[r][m]);
          }
        }
      }
    } else {
      for (int64_t k = k0; k < kvec; k += kStep<kBits>()) {
        if (R > 1) _mm_prefetch(next + k * R, _MM_HINT_T1);
        for (int r = 0; r < R; ++r) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow[r] + k));
          const __m512i wi = kSigned ? _mm512_cvtepi8_epi32(b)
                                     : _mm512_sub_epi32(_mm512_cvtepu8_epi32(b), zp[r]);
          const __m512 w = _mm512_cvtepi32_ps(wi);
          for (int m = 0; m < MB; ++m)
            part[r][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp + m * K + k), part[r][m]);
        }
      }
    }
    if (kvec < kend) weight_only_tail<R, MB, kBits, kSigned>(wrow, zrow, g, K, kvec, kend, xp, part);
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(sc[r][g]);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(part[r][m], s, acc[r][m]);
    }
  }
}

// The vector part for weight_only_tiles.h.
struct Kernel {
  using Vec = __m512;
  static constexpr int kMaxBlock = 4;  // activation rows per pass over a weight row
  template <int R, int MB, int kBits, bool kSigned>
  static void dot(const uint8_t* const* wrow, const float* const* sc, const uint8_t* const* zrow,
                  int64_t K, int64_t gsize, const float* xp, Vec acc[R][MB]) {
    rows_dot<R, MB, kBits, kSigned>(wrow, sc, zrow, K, gsize, xp, acc);
  }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

void linear_weight_only_avx512(const WeightOnlyProblem& p, Format fmt, int64_t M) {
  weight_only_dispatch<Kernel>(p, fmt, M);
}

}  // namespace cpu
}  // namespace tensorslim
