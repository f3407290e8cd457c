// panel_gemm on AVX-512: 16 lanes, 6 x 32 broadcast micro-tiles and 6 x 4 rows-dot tiles
// (loops in panel_gemm_tiles.h).
#include <immintrin.h>

#include <cstring>

#include "panel_gemm_tiles.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

struct Vector {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  // Broadcast micro-tiles of up to 12 rows: 24 accumulators + 2 weight vectors + 1 broadcast of
  // the 32 registers. On Intel 12 (6, as on AVX2, ran INT8 4096 x 4096 at 256 rows 1.31x
  // oneDNN's time against 1.11x; Intel Xeon with AMX, docs/benchmarks.md thirty-sixth session);
  // elsewhere 6, as measured on Zen 4 / 5 (12-row bf16 tiles ran slower on Zen 4; 12-row fp32
  // ones not measured on AMD).
  static constexpr int kPanelRows = 12;
  static int panel_rows() {
    static const int rows = cpu_is_intel() ? 12 : 6;
    return rows;
  }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  // Rows-dot tiles: 6 x 4 accumulators + 4 weight vectors + 1 activation of 32 registers.
  static constexpr int kDotRows = 6, kDotCols = 4;
  static Vec load_first(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  // out[i] = the sum of a[i]'s lanes, i < kDotCols.
  static void sum_lanes(const Vec* a, float* out) {
    __m256 h[4];
    for (int i = 0; i < 4; ++i)
      h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
};

#define TS_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// Rows of the bf16 micro-tiles (12 tried on Zen 4: slower, see below).
constexpr int kBf16PanelRows = 6;

// fp32 micro-panel [kc][32] -> bf16 pairs [ceil(kc / 2)][32][2]: dword j of pair i holds
// column j's values k = 2i (low half) and 2i + 1 (high; 0 past kc), rounded to nearest even.
TS_BF16 void pack_bf16_pairs(const float* packed, int64_t kc, uint16_t* out) {
  alignas(64) static const int16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t i = 0; 2 * i < kc; ++i)
    for (int h = 0; h < 2; ++h) {
      const __m512 lo = _mm512_loadu_ps(packed + 2 * i * 32 + 16 * h);
      const __m512 hi = 2 * i + 1 < kc ? _mm512_loadu_ps(packed + (2 * i + 1) * 32 + 16 * h) : _mm512_setzero_ps();
      const __m512i words = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // lo in words 0-15
      _mm512_storeu_si512(out + i * 64 + 32 * h, _mm512_permutexvar_epi16(idx, words));
    }
}

// c[MB][32] (+)= x[MB rows, kc] @ b for bf16 x and b as pack_bf16_pairs lays it out; an odd kc's
// last value pairs with a zero (x's value past kc is not read).
template <int MB>
TS_BF16 void bf16_micro(const uint16_t* x, int64_t ldx, const uint16_t* b, int64_t kc, float* c, bool accumulate) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < 2; ++h) acc[m][h] = accumulate ? _mm512_loadu_ps(c + m * 32 + 16 * h) : _mm512_setzero_ps();
  for (int64_t i = 0; i < (kc + 1) / 2; ++i) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + i * 64));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + i * 64 + 32));
    const bool alone = 2 * i + 1 == kc;  // an odd kc's last value: not a pair in x
    for (int m = 0; m < MB; ++m) {
      uint32_t two = x[m * ldx + 2 * i];
      if (!alone) std::memcpy(&two, x + m * ldx + 2 * i, 4);  // one 32-bit load for the pair
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(two)));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, b1);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(c + m * 32 + 16 * h, acc[m][h]);
}

TS_BF16 void bf16_micro_any(int mb, const uint16_t* x, int64_t ldx, const uint16_t* b, int64_t kc, float* c,
                            bool accumulate) {
  switch (mb) {
    case 1: return bf16_micro<1>(x, ldx, b, kc, c, accumulate);
    case 2: return bf16_micro<2>(x, ldx, b, kc, c, accumulate);
    case 3: return bf16_micro<3>(x, ldx, b, kc, c, accumulate);
    case 4: return bf16_micro<4>(x, ldx, b, kc, c, accumulate);
    case 5: return bf16_micro<5>(x, ldx, b, kc, c, accumulate);
    default: return bf16_micro<kBf16PanelRows>(x, ldx, b, kc, c, accumulate);
  }
}

}  // namespace

void panel_gemm_avx512(const PanelGemmProblem& p) { panel_gemm_run<Vector>(p); }

// panel_gemm_run's loop for bf16 activations: each K block's fp32 micro-panels (pack_block)
// rounded to bf16 pairs, then the bf16 micro-tiles.
void panel_gemm_bf16_avx512(const PanelGemmProblem& p) {
  constexpr int NR = 32, MR = kBf16PanelRows, kMicro = kPanelCols / NR;
  constexpr int64_t KC = panel_k_block<Vector>();
  const int64_t K = p.K, M = p.M;
  const int64_t panels = (p.N + kPanelCols - 1) / kPanelCols;
  parallel_for(panels, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> rows, packed, sums;
    thread_local std::vector<uint16_t> pairs;
    const int64_t ldr = decoded_row_stride(p, KC);
    rows.resize(kPanelCols * ldr);
    packed.resize(kPanelCols * KC);
    pairs.resize(kPanelCols * (KC + 1));
    sums.resize(kMicro * M * NR);
    for (int64_t panel = b; panel < e; ++panel) {
      const int64_t n0 = panel * kPanelCols, cols = std::min<int64_t>(kPanelCols, p.N - n0);
      const int micro = static_cast<int>((cols + NR - 1) / NR);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0), kc2 = (kc + 1) / 2 * 2;
        pack_block<NR>(p, n0, cols, k0, kc, rows.data(), ldr, packed.data());
        for (int u = 0; u < micro; ++u) pack_bf16_pairs(packed.data() + u * NR * kc, kc, pairs.data() + u * NR * kc2);
        for (int64_t m0 = 0, left_tiles = (M + MR - 1) / MR; m0 < M; --left_tiles) {
          const int mb = static_cast<int>((M - m0 + left_tiles - 1) / left_tiles);
          for (int u = 0; u < micro; ++u)
            bf16_micro_any(mb, p.x_bf16 + m0 * p.ldx + k0, p.ldx, pairs.data() + u * NR * kc2, kc,
                           sums.data() + (u * M + m0) * NR, k0 > 0);
          m0 += mb;
        }
      }
      for (int u = 0; u < micro; ++u)
        store_tile(p, sums.data() + u * M * NR, NR, 0, M, n0 + u * NR, std::min<int64_t>(NR, cols - u * NR));
    }
  });
}

}  // namespace cpu
}  // namespace tensorslim
