// The loops of panel_gemm shared by panel_gemm_avx2.cpp and panel_gemm_avx512.cpp (included
// by those files only, so each instantiation gets its ISA's flags). A vector type V provides
// Vec, kLanes, zero(), load(p), broadcast(p), fma(a, b, c) = a * b + c, store(p, v), and the
// broadcast micro-tiles' rows: panel_rows(), at most kPanelRows.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "half.h"
#include "panel_gemm.h"
#include "parallel.h"

namespace tensorslim {
namespace cpu {

// src [8 rows, stride ls] -> dst [8 rows, stride ld] transposed, in AVX registers (both
// ISAs that include this file have AVX2).
inline void transpose8x8(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0x44);
      r[i + j + 2] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0xEE);
    }
  // r[0..3] hold columns 0, 2, 1, 3 of rows 0-3 (per 128-bit half), r[4..7] those of rows 4-7.
  const int order[4] = {0, 2, 1, 3};
  for (int c = 0; c < 4; ++c) {
    const __m256 a = r[order[c]], b = r[4 + order[c]];
    _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(a, b, 0x31));
  }
}

// rows [nr][kc] (row stride ld) -> packed [kc][NR], columns nr..NR-1 zero (a partial last panel).
template <int NR>
void pack_panel(const float* rows, int64_t nr, int64_t kc, int64_t ld, float* packed) {
  const int64_t k8 = nr == NR ? kc / 8 * 8 : 0;
  for (int64_t k = 0; k < k8; k += 8)
    for (int j = 0; j < NR; j += 8) transpose8x8(rows + j * ld + k, ld, packed + k * NR + j, NR);
  for (int64_t k = k8; k < kc; ++k) {
    float* dst = packed + k * NR;
    for (int64_t j = 0; j < nr; ++j) dst[j] = rows[j * ld + k];
    for (int64_t j = nr; j < NR; ++j) dst[j] = 0.0f;
  }
}

// The micro-kernel: c[MB][2 * kLanes] (+)= x[MB rows, kc] @ b, b packed [kc][2 * kLanes];
// `accumulate` adds to c (the K blocks after the first). 2 * MB accumulators; per k one packed
// weight row (two vectors) and MB broadcast activations.
template <class V, int MB>
void panel_micro(const float* x, int64_t ldx, const float* b, int64_t kc, float* c, bool accumulate) {
  constexpr int NR = 2 * V::kLanes;
  typename V::Vec acc[MB][2];
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = accumulate ? V::load(c + m * NR) : V::zero();
    acc[m][1] = accumulate ? V::load(c + m * NR + V::kLanes) : V::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const typename V::Vec b0 = V::load(b + k * NR), b1 = V::load(b + k * NR + V::kLanes);
    for (int m = 0; m < MB; ++m) {
      const typename V::Vec a = V::broadcast(x + m * ldx + k);
      acc[m][0] = V::fma(a, b0, acc[m][0]);
      acc[m][1] = V::fma(a, b1, acc[m][1]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    V::store(c + m * NR, acc[m][0]);
    V::store(c + m * NR + V::kLanes, acc[m][1]);
  }
}

// Output columns decoded together: the activation tile read for one micro-panel is reused
// by the others from L1, so x streams from memory once per 64 columns, not once per 16.
constexpr int kPanelCols = 64;
// K block: one micro-panel's block (kc x 2 * kLanes floats, 16 KiB) stays in L1 while every
// activation tile passes over it.
template <class V>
constexpr int64_t panel_k_block() { return 2048 / V::kLanes; }

// mb (1 .. V::kPanelRows) rows through the micro-kernel instantiated for it.
template <class V, int MB = 1>
void panel_micro_any(int mb, const float* x, int64_t ldx, const float* b, int64_t kc, float* c,
                     bool accumulate) {
  if constexpr (MB < V::kPanelRows) {
    if (mb != MB) return panel_micro_any<V, MB + 1>(mb, x, ldx, b, kc, c, accumulate);
  }
  panel_micro<V, MB>(x, ldx, b, kc, c, accumulate);
}

// Rows-dot micro-kernel for a few activation rows: sums[m][n] = x[m] . w[n] for MB activation
// rows and V::kDotCols decoded weight rows, both read along K as stored (no packed copy), each
// product held in a vector's lanes and summed across them once at the end. MB * kDotCols
// accumulators + kDotCols weight vectors + 1 activation vector fit the ISA's registers.
// K's tail is read with masked loads, so nothing past a row is touched.
template <class V, int MB>
void dot_micro(const float* x, int64_t ldx, const float* w, int64_t K, float* sums) {
  constexpr int L = V::kLanes, kDotCols = V::kDotCols;
  typename V::Vec acc[MB][kDotCols];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < kDotCols; ++n) acc[m][n] = V::zero();
  const int64_t kv = K / L * L;
  for (int64_t k = 0; k < kv; k += L) {
    typename V::Vec wv[kDotCols];
    for (int n = 0; n < kDotCols; ++n) wv[n] = V::load(w + n * K + k);
    for (int m = 0; m < MB; ++m) {
      const typename V::Vec a = V::load(x + m * ldx + k);
      for (int n = 0; n < kDotCols; ++n) acc[m][n] = V::fma(a, wv[n], acc[m][n]);
    }
  }
  if (kv < K) {
    const int tail = static_cast<int>(K - kv);
    typename V::Vec wv[kDotCols];
    for (int n = 0; n < kDotCols; ++n) wv[n] = V::load_first(w + n * K + kv, tail);
    for (int m = 0; m < MB; ++m) {
      const typename V::Vec a = V::load_first(x + m * ldx + kv, tail);
      for (int n = 0; n < kDotCols; ++n) acc[m][n] = V::fma(a, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m) V::sum_lanes(acc[m], sums + m * kDotCols);
}

template <class V>
void dot_micro_any(int mb, const float* x, int64_t ldx, const float* w, int64_t K, float* sums) {
  static_assert(V::kDotRows >= 2 && V::kDotRows <= 6, "dot_micro_any covers 1..6 rows");
  switch (mb) {
    case 1: return dot_micro<V, 1>(x, ldx, w, K, sums);
    case 2: return dot_micro<V, 2>(x, ldx, w, K, sums);
    case 3: if constexpr (V::kDotRows >= 3) return dot_micro<V, 3>(x, ldx, w, K, sums); break;
    case 4: if constexpr (V::kDotRows >= 4) return dot_micro<V, 4>(x, ldx, w, K, sums); break;
    case 5: if constexpr (V::kDotRows >= 5) return dot_micro<V, 5>(x, ldx, w, K, sums); break;
    default: break;
  }
  dot_micro<V, V::kDotRows>(x, ldx, w, K, sums);
}

// y[m, n0 + j] = sums[m][j] + bias for a tile of rows x cols outputs.
inline void store_tile(const PanelGemmProblem& p, const float* sums, int64_t ld_sums, int64_t m0,
                       int64_t rows, int64_t n0, int64_t cols) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < cols; ++j) {
      const float y = sums[m * ld_sums + j] + (p.bias ? p.bias[n0 + j] : 0.0f);
      const int64_t off = (m0 + m) * p.ldo + n0 + j;
      if (p.out_bf16)
        static_cast<uint16_t*>(p.out)[off] = float_to_bf16(y);
      else
        static_cast<float*>(p.out)[off] = y;
    }
}

// The rows-dot kernel runs for up to kDotMaxRows activation rows, of at most kDotMaxValues
// values in all and rows of at most kDotMaxK: it uses the decoded weight rows as stored, without
// the packed copy the broadcast micro-kernel needs (at MiniLM's 384 x 1536 and 9-31 rows that
// copy's 8 x 8 transposes took more time than the multiply-adds), but reads every activation
// row again for each V::kDotCols weight rows, which must come from L1 / L2 (4096 x 4096 on
// AVX2 at 32 rows: 25-28 ms against 19 ms with the broadcast kernel's K blocks).
constexpr int64_t kDotMaxRows = 64;
constexpr int64_t kDotMaxValues = int64_t{1} << 16;
constexpr int64_t kDotMaxK = 2048;

template <class V>
void dot_gemm_run(const PanelGemmProblem& p) {
  constexpr int kDotCols = V::kDotCols;
  const int64_t K = p.K, M = p.M, MR = V::kDotRows;
  const int64_t panels = (p.N + kPanelCols - 1) / kPanelCols;
  parallel_for(panels, 1, [&](int64_t b, int64_t e) {
    // kDotCols decoded weight rows at a time: written and then read from L1 (a whole panel's
    // rows spilled to L2, and the decode's stores took a third of the time).
    thread_local std::vector<float> rows;
    rows.resize(kDotCols * K);
    float* wrows = rows.data();
    float sums[V::kDotRows * kDotCols];
    for (int64_t n0 = b * kPanelCols, n_end = std::min(p.N, e * kPanelCols); n0 < n_end; n0 += kDotCols) {
      // A last block of fewer rows leaves the others stale: their sums are not stored.
      const int64_t nc = std::min<int64_t>(kDotCols, n_end - n0);
      p.decode(n0, nc, 0, K, wrows);
      // Tiles of nearly equal height: 13 rows run as 5 + 4 + 4, not 6 + 6 + 1.
      for (int64_t m0 = 0, left_tiles = (M + MR - 1) / MR; m0 < M; --left_tiles) {
        const int mb = static_cast<int>((M - m0 + left_tiles - 1) / left_tiles);
        dot_micro_any<V>(mb, p.x + m0 * p.ldx, p.ldx, wrows, K, sums);
        store_tile(p, sums, kDotCols, m0, mb, n0, nc);
        m0 += mb;
      }
    }
  });
}

// The fp32 micro-panels [kc][NR] of one K block of a 64-row panel (rows n0 .. n0 + cols),
// through decode_packed, a ranged decode + pack_panel, or pack_panel from the whole decoded
// rows (`rows`, row stride ldr) that the caller decoded once.
template <int NR>
void pack_block(const PanelGemmProblem& p, int64_t n0, int64_t cols, int64_t k0, int64_t kc, float* rows,
                int64_t ldr, float* packed) {
  const int micro = static_cast<int>((cols + NR - 1) / NR);
  if (p.decode_packed) {
    for (int u = 0; u < micro; ++u)
      p.decode_packed(n0 + u * NR, std::min<int64_t>(NR, cols - u * NR), k0, kc, packed + u * NR * kc);
    return;
  }
  const float* src = rows + (p.decode_ranges ? 0 : k0);
  const int64_t ld = p.decode_ranges ? kc : ldr;
  if (p.decode_ranges) p.decode(n0, cols, k0, kc, rows);
  for (int u = 0; u < micro; ++u)
    pack_panel<NR>(src + u * NR * ld, std::min<int64_t>(NR, cols - u * NR), kc, ld, packed + u * NR * kc);
}

// Whole rows sit 16 floats further apart than K: at K = 4096 the 8 x 8 transposes read 8
// rows 16 KiB apart, which share one L1 set (fp8 4096 x 4096 at 4 rows: the pack took ~55%).
inline int64_t decoded_row_stride(const PanelGemmProblem& p, int64_t KC) {
  return p.decode_ranges ? std::min(KC, p.K) : p.K + 16;
}

template <class V>
void panel_gemm_run(const PanelGemmProblem& p) {
  if (p.M <= kDotMaxRows && p.M * p.K <= kDotMaxValues && p.K <= kDotMaxK) return dot_gemm_run<V>(p);
  constexpr int NR = 2 * V::kLanes, kMicro = kPanelCols / NR;
  const int64_t MR = V::panel_rows();  // at most V::kPanelRows
  constexpr int64_t KC = panel_k_block<V>();
  const int64_t K = p.K, M = p.M;
  const int64_t panels = (p.N + kPanelCols - 1) / kPanelCols;
  parallel_for(panels, 1, [&](int64_t b, int64_t e) {
    // Per thread: decoded rows (one K block of the panel's rows with ranged decodes, else the
    // whole rows), the block's packed copies (one [kc][NR] block per micro-panel, in L2) and
    // the fp32 sums of every activation row for each micro-panel.
    thread_local std::vector<float> rows, packed, sums;
    const int64_t ldr = decoded_row_stride(p, KC);
    rows.resize(kPanelCols * ldr);
    packed.resize(kPanelCols * KC);
    sums.resize(kMicro * M * NR);
    for (int64_t panel = b; panel < e; ++panel) {
      const int64_t n0 = panel * kPanelCols, cols = std::min<int64_t>(kPanelCols, p.N - n0);
      const int micro = static_cast<int>((cols + NR - 1) / NR);
      if (!p.decode_ranges)
        for (int64_t r = 0; r < cols; ++r) p.decode(n0 + r, 1, 0, K, rows.data() + r * ldr);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        pack_block<NR>(p, n0, cols, k0, kc, rows.data(), ldr, packed.data());
        // Tiles of nearly equal height: 32 rows run as 6 x 2 + 5 x 4, not 6 x 5 + 2, whose
        // four accumulator chains cannot keep both FMA pipes busy.
        for (int64_t m0 = 0, left_tiles = (M + MR - 1) / MR; m0 < M; --left_tiles) {
          const int mb = static_cast<int>((M - m0 + left_tiles - 1) / left_tiles);
          for (int u = 0; u < micro; ++u)
            panel_micro_any<V>(mb, p.x + m0 * p.ldx + k0, p.ldx, packed.data() + u * NR * kc, kc,
                               sums.data() + (u * M + m0) * NR, k0 > 0);
          m0 += mb;
        }
      }
      for (int u = 0; u < micro; ++u)
        store_tile(p, sums.data() + u * M * NR, NR, 0, M, n0 + u * NR,
                   std::min<int64_t>(NR, cols - u * NR));
    }
  });
}

}  // namespace cpu
}  // namespace tensorslim
