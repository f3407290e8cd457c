// The ISA-independent half of the W4A8 kernels, shared by gemm_w4a8_avx512.cpp and
// gemm_w4a8_avx2.cpp: activation re-layout and group sums, the panel buffers, the loop
// over panels and token tiles, and the driver. Only the vector parts differ per ISA.
//
// Layout (both ISAs). Output rows go kRows to a panel, one per 32-bit lane (16 for AVX-512,
// 8 for AVX2). Each panel's packed weights are transposed and unpacked once into a
// thread-local buffer, u8 [K/8][2][kRows][4]: for 8 consecutive k, first the low nibbles
// (k0 k2 k4 k6) of the panel's rows, then the high ones (k1 k3 k5 k7). u = code + 8 (int4, a
// nibble XOR 8) or the code (uint4) lies in 0..15, so a u8 x s8 dot product is exact and
// the group dot is d = sum(u * q) - o * sum(q), o = 8 or the zero point. Activations are
// re-laid to match (k0 k2 k4 k6 k1 k3 k5 k7 in every 8, zero-padded to a multiple of 8), so
// four of them are one broadcast operand. Every token tile reuses the unpacked panel.
//
// Everything is in an anonymous namespace: each per-ISA file compiles its own copy with its
// own -m flags (a shared inline symbol could resolve to the AVX-512 copy on an AVX2 CPU).
//
// A kernel type Ker provides:
//   Ker::kRows, Ker::kTokens        panel rows (lanes) and tokens per register tile
//   Ker::relayout_row(src, K, Kp, dst)              one token's s8 codes in kernel order
//   Ker::pack_panel(a, n0, rows, K8, groups, next_rows, panel)
//   Ker::template tile<MB, Dot>(a, acts, panel, shape, n0, rows, m0)
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

// s8 activations in the kernel's order plus each token's per-group code sums.
struct Acts {
  const int8_t* q;  // [M, Kp]
  int64_t Kp;
  const int32_t* sums;  // [M, groups]
};

// One panel: unpacked weights [K8][2][kRows][4], and per group the rows' scales and offsets.
struct Panel {
  std::vector<uint8_t> w;
  std::vector<float> s;
  std::vector<int32_t> o;
};

struct Shape {
  int64_t K8, groups, gsteps;  // steps of 8 k: in all, per (full) group
  // Steps of group g: gsteps, fewer for a short last group (K not a multiple of the group;
  // its zero-padded activations past K add nothing).
  int64_t steps(int64_t g) const { return std::min(gsteps, K8 - g * gsteps); }
};

template <class Ker>
void relayout_acts(const W4A8Args& a, int64_t Kp, int64_t groups, int64_t gsize, int8_t* q,
                   int32_t* sums) {
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 20) / std::max<int64_t>(a.K, 1));
  parallel_for(a.M, grain, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const int8_t* src = a.qx + m * a.K;
      Ker::relayout_row(src, a.K, Kp, q + m * Kp);
      for (int64_t g = 0; g < groups; ++g) {
        int32_t s = 0;
        for (int64_t k = g * gsize; k < std::min(a.K, (g + 1) * gsize); ++k) s += src[k];
        sums[m * groups + g] = s;
      }
    }
  });
}

// The rows' scales and offsets per group, padding rows (r >= rows) zero.
template <class Ker>
void panel_params(const W4A8Args& a, int64_t n0, int64_t rows, int64_t groups, Panel& p) {
  constexpr int R = Ker::kRows;
  for (int64_t g = 0; g < groups; ++g)
    for (int r = 0; r < R; ++r) {
      const bool in = r < rows;
      p.s[g * R + r] = in ? a.scales[(n0 + r) * groups + g] : 0.0f;
      p.o[g * R + r] = !in ? 0 : a.zero_points ? a.zero_points[(n0 + r) * groups + g] : 8;
    }
}

// Panels [pb, pe): unpack each once, then every token tile over it.
template <class Ker, class Dot>
__attribute__((always_inline)) inline void run_panels(const W4A8Args& a, const Acts& x,
                                                      const Shape& sh, int64_t pb, int64_t pe) {
  constexpr int R = Ker::kRows, T = Ker::kTokens;
  static_assert(T >= 4 && T <= 8, "tile sizes 1..8");
  thread_local Panel tls;
  Panel& p = tls;  // one TLS lookup, not one per use
  p.w.resize(sh.K8 * 8 * R);
  p.s.resize(sh.groups * R);
  p.o.resize(sh.groups * R);
  for (int64_t pi = pb; pi < pe; ++pi) {
    const int64_t n0 = pi * R, rows = std::min<int64_t>(R, a.N - n0);
    const int64_t next_rows = pi + 1 < pe ? std::min<int64_t>(R, a.N - n0 - R) : 0;
    Ker::pack_panel(a, n0, rows, sh.K8, sh.groups, next_rows, p);
    panel_params<Ker>(a, n0, rows, sh.groups, p);
    for (int64_t m0 = 0; m0 < a.M; m0 += T) {
      switch (std::min<int64_t>(T, a.M - m0)) {
        case 1: Ker::template tile<1, Dot>(a, x, p, sh, n0, rows, m0); break;
        case 2: Ker::template tile<2, Dot>(a, x, p, sh, n0, rows, m0); break;
        case 3: Ker::template tile<3, Dot>(a, x, p, sh, n0, rows, m0); break;
        case 4: Ker::template tile<std::min(4, T), Dot>(a, x, p, sh, n0, rows, m0); break;
        case 5: Ker::template tile<std::min(5, T), Dot>(a, x, p, sh, n0, rows, m0); break;
        case 6: Ker::template tile<std::min(6, T), Dot>(a, x, p, sh, n0, rows, m0); break;
        case 7: Ker::template tile<std::min(7, T), Dot>(a, x, p, sh, n0, rows, m0); break;
        default: Ker::template tile<T, Dot>(a, x, p, sh, n0, rows, m0); break;
      }
    }
  }
}

// The whole GEMM: re-lay the activations, then panels split over the threads, each range
// run by run(a, acts, shape, first_panel, end_panel).
template <class Ker, class Run>
void w4a8_drive(const W4A8Args& a, const Run& run) {
  constexpr int R = Ker::kRows;
  const int64_t Kp = (a.K + 7) / 8 * 8;
  Shape sh;
  sh.K8 = Kp / 8;
  sh.groups = lowbit_groups(a.K, a.group);  // ceil(K / group): the last may be short
  sh.gsteps = a.group >= a.K ? sh.K8 : a.group / 8;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<int32_t> sums;
  xq.resize(a.M * Kp);
  sums.resize(a.M * sh.groups);
  relayout_acts<Ker>(a, Kp, sh.groups, a.group, xq.data(), sums.data());
  const Acts x{xq.data(), Kp, sums.data()};
  const int64_t panels = (a.N + R - 1) / R;
  // Below ~1M multiply-adds a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / (R * Kp * a.M));
  parallel_for(panels, grain, [&](int64_t b, int64_t e) { run(a, x, sh, b, e); });
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
