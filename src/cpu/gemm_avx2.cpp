// Native AVX2 weight-only GEMV/GEMM for a few rows of activations (M <= 8): the AVX-512
// kernel's twin (gemm_avx512.cpp), 8 lanes at a time. Each weight row is read once,
// dequantized in registers and multiplied with every activation row.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "hsum_avx2.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"
#include "weight_only_native.h"
#include "weight_only_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

// One half (8 bytes = 16 values) of a 32-value INT4 block: lo = its low nibbles (even k),
// hi = its high nibbles (odd k), matching pack_activations' de-interleaved order.
template <bool kSigned>
inline void int4_half(const uint8_t* w, __m256i zp, __m256& lo, __m256& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
  __m256i l, h;
  if (kSigned) {
    l = _mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28);
    h = _mm256_srai_epi32(_mm256_slli_epi32(b, 24), 28);
  } else {
    l = _mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0xF)), zp);
    h = _mm256_sub_epi32(_mm256_srli_epi32(b, 4), zp);
  }
  lo = _mm256_cvtepi32_ps(l);
  hi = _mm256_cvtepi32_ps(h);
}

// Values per vector chunk: a 32-value INT4 block, or one register of INT8 codes.
template <int kBits>
constexpr int64_t kStep() { return kBits == 4 ? 32 : 8; }

// Adds the scalar tail of group g (see weight_only_tail_sums) to lane 0 of part.
template <int R, int MB, int kBits, bool kSigned>
void weight_only_tail(const uint8_t* const* wrow, const uint8_t* const* zrow, int64_t g, int64_t K,
                      int64_t k0, int64_t kend, const float* xp, __m256 part[R][MB]) {
  float t[R][MB];
  weight_only_tail_sums<R, MB, kBits, kSigned>(wrow, zrow, g, K, k0, kend, xp, t);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      part[r][m] = _mm256_add_ps(part[r][m], _mm256_setr_ps(t[r][m], 0, 0, 0, 0, 0, 0, 0));
}

// acc[r][m] (8 lanes) = sum over groups of scale[r][g] * sum_k w[r][k] * x[m][k] for R
// weight rows at once: R * MB independent FMA chains hide the FMA latency, and R
// weight streams keep more memory requests in flight.
template <int R, int MB, int kBits, bool kSigned>
void rows_dot(const uint8_t* const* wrow, const float* const* sc, const uint8_t* const* zrow,
              int64_t K, int64_t gsize, const float* xp, __m256 acc[R][MB]) {
  const int64_t groups = num_groups(K, gsize);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  // The next R rows (they follow these in memory) go to L2 as one linear stream as the steps
  // go: R short streams alone leave memory idle between pages.
  const char* next = reinterpret_cast<const char*>(wrow[R - 1] + (R > 1 ? wrow[R - 1] - wrow[R - 2] : 0));
  // Groups of 64 values or fewer: the next R rows' scales as one stream too (R short scale
  // streams went unprefetched: weights from memory, Zen 5, 11008 x 4096 g32 batch 1).
  const char* next_scales = reinterpret_cast<const char*>(sc[R - 1] + groups);
  for (int64_t g = 0; g < groups; ++g) {
    if (gsize <= 64) _mm_prefetch(next_scales + g * 4 * R, _MM_HINT_T1);
    __m256 part[R][MB];
    __m256i zp[R];
    for (int r = 0; r < R; ++r) {
      zp[r] = _mm256_set1_epi32(zrow[r] ? zrow[r][g] : 0);
      for (int m = 0; m < MB; ++m) part[r][m] = _mm256_setzero_ps();
    }
    const int64_t k0 = g * gsize, kend = std::min(k0 + gsize, K);
    const int64_t kvec = k0 + (kend - k0) / kStep<kBits>() * kStep<kBits>();  // vector chunks end here
    if (kBits == 4) {
      for (int64_t k = k0; k < kvec; k += 32) {
        if (R > 1) _mm_prefetch(next + k / 2 * R, _MM_HINT_T1);
        for (int half = 0; half < 2; ++half) {
          for (int r = 0; r < R; ++r) {
            __m256 lo, hi;
            int4_half<kSigned>(wrow[r] + k / 2 + 8 * half, zp[r], lo, hi);
            for (int m = 0; m < MB; ++m) {
              const float* x = xp + m * K + k + 8 * half;
              part[r][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x), part[r][m]);
              part[r][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + 16), part[r][m]);
            }
          }
        }
      }
    } else {
      for (int64_t k = k0; k < kvec; k += kStep<kBits>()) {
        if (R > 1) _mm_prefetch(next + k * R, _MM_HINT_T1);
        for (int r = 0; r < R; ++r) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrow[r] + k));
          const __m256i wi = kSigned ? _mm256_cvtepi8_epi32(b)
                                     : _mm256_sub_epi32(_mm256_cvtepu8_epi32(b), zp[r]);
          const __m256 w = _mm256_cvtepi32_ps(wi);
          for (int m = 0; m < MB; ++m)
            part[r][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + m * K + k), part[r][m]);
        }
      }
    }
    if (kvec < kend) weight_only_tail<R, MB, kBits, kSigned>(wrow, zrow, g, K, kvec, kend, xp, part);
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(sc[r][g]);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(part[r][m], s, acc[r][m]);
    }
  }
}

// The vector part for weight_only_tiles.h.
struct Kernel {
  using Vec = __m256;
  static constexpr int kMaxBlock = 2;  // activation rows per pass: 16 ymm registers hold 2x2 tiles
  template <int R, int MB, int kBits, bool kSigned>
  static void dot(const uint8_t* const* wrow, const float* const* sc, const uint8_t* const* zrow,
                  int64_t K, int64_t gsize, const float* xp, Vec acc[R][MB]) {
    rows_dot<R, MB, kBits, kSigned>(wrow, sc, zrow, K, gsize, xp, acc);
  }
  static float sum(Vec v) { return hsum_ps(v); }
};

}  // namespace

void linear_weight_only_avx2(const WeightOnlyProblem& p, Format fmt, int64_t M) {
  weight_only_dispatch<Kernel>(p, fmt, M);
}

}  // namespace cpu
}  // namespace tensorslim
