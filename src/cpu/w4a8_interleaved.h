// The ISA-independent half of the W4A8 kernels on linear_w4a8_pack's copy (layout:
// gemm_w4a8.h), bit-exact with linear_w4a8_reference like the other W4A8 kernels.
//
// Each 64-byte step of a panel is 8 codes of 16 rows, a 32-bit lane per row: its low nibbles
// are codes 8j, 8j+2, 8j+4, 8j+6 and its high nibbles 8j+1, .. 8j+7. Each token's s8 codes are
// re-laid per step as [4 even k][4 odd k] (zeros past K), so one broadcast 4-byte word of the
// token times the step's low (high) nibbles sums 4 products into each row's lane: no lane sums
// per group (the row-wise GEMV's reduction), and a panel is one stream of codes then scales.
// Groups are whole steps (group a multiple of 8, or one group per row); the rescale
// (d = sum(u * q) - o * sum(q); acc = acc + float(d) * scale) runs one output per lane in the
// reference's order.
//
// Everything is in an anonymous namespace: each per-ISA file compiles its own copy with its
// own -m flags (the layout functions are shared with the ISA-free w4a8_interleaved.cpp).
//
// A kernel type Ker provides Ker::kTokens (tokens per pass), Ker::relayout_row (as for
// w4a8_panels.h) and Ker::panel(a, acts, shape, panel, n0, rows, m0, m1, first): outputs
// [n0, n0 + rows) of tokens [m0, m1) (at most kTokens) from the panel's bytes; `first`: the
// first pass over these panels, which prefetches them (later passes find them in L2).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/lowbit.h"
#include "w4a8_panels.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int64_t kPackedRows = 16;     // rows per panel, one 32-bit lane each
constexpr int64_t kStepCodes = 8;       // codes per row per 64-byte step
constexpr int64_t kPackedHeader = 64;   // bytes before the first panel
constexpr char kPackedMagic[8] = {'t', 's', 'w', '4', 'a', '8', 'i', '1'};
// Each step of a first pass prefetches the line this far ahead into L2: with the weights in
// memory (not in cache) 4096 x 4096 at 1-2 tokens ran at 0.86-0.97x the row-wise GEMV (which
// prefetches its next 16 rows) without, 1.00-1.05x with 4 KiB (2 KiB: 0.87-0.96x, 8 KiB:
// 0.97-1.03x), Zen 4; in bench_w4a8_decode (8 layers from memory) 4, 16 and 64 KiB alike.
constexpr int64_t kPrefetchAhead = 4096;

// Where things are inside one panel, for N x K weights with `group` codes per scale.
struct PackedShape {
  int64_t steps;        // ceil(K / 8)
  int64_t groups;       // scale groups per row
  int64_t gsteps;       // steps per group (the last group may have fewer)
  int64_t scales_at;    // byte offset of [groups][16] f32 scales
  int64_t zps_at;       // byte offset of [groups][16] u8 zero points (asym only)
  int64_t panel_bytes;  // the panel, padded to 64
  int64_t panels;       // ceil(N / 16)
  int64_t group_steps(int64_t g) const { return std::min(gsteps, steps - g * gsteps); }
};

// False where no packed copy exists for this shape (see linear_w4a8_packed_bytes).
inline bool packed_shape(int64_t N, int64_t K, int64_t group, bool asym, PackedShape& s) {
  if (K <= 0 || N < 0 || group <= 0 || (group < K && group % kStepCodes != 0)) return false;
  s.steps = (K + kStepCodes - 1) / kStepCodes;
  s.groups = lowbit_groups(K, group);
  s.gsteps = group >= K ? s.steps : group / kStepCodes;
  s.scales_at = s.steps * 64;
  s.zps_at = s.scales_at + s.groups * kPackedRows * 4;
  s.panel_bytes = (s.zps_at + (asym ? s.groups * kPackedRows : 0) + 63) / 64 * 64;
  s.panels = (N + kPackedRows - 1) / kPackedRows;
  return true;
}

struct PackedHeader {
  char magic[8];
  int64_t N, K, group, asym;
};
static_assert(sizeof(PackedHeader) <= kPackedHeader, "header fits its 64 bytes");

template <class Ker>
void w4a8_packed_drive(const W4A8Args& a, const uint8_t* packed) {
  PackedShape sh;
  packed_shape(a.N, a.K, a.group, a.zero_points != nullptr, sh);  // the caller checked the header
  // Activations as the panel kernels re-lay them (w4a8_panels.h), on the threads: per 8 k,
  // 4 even then 4 odd, zero-padded to 8 * steps.
  thread_local std::vector<int8_t> q;
  thread_local std::vector<int32_t> sums;
  q.resize(a.M * sh.steps * kStepCodes);
  sums.resize(a.M * sh.groups);
  relayout_acts<Ker>(a, sh.steps * kStepCodes, sh.groups, a.group, q.data(), sums.data());
  const Acts x{q.data(), sh.steps * kStepCodes, sums.data()};
  const uint8_t* panels = packed + kPackedHeader;
  // Work items: up to 256 KiB of panels (they stay in L2) x up to 64 tokens, each token pass
  // (its activations in L1) over every panel of the item. Panels in the outer loop with all
  // tokens inside read every token's activations once per panel: MiniLM's 1536 x 384 at 640
  // tokens ran at 0.58x the per-call panel kernels that way.
  constexpr int64_t kBlockTokens = 64;
  const int64_t blocks = (a.M + kBlockTokens - 1) / kBlockTokens;
  int64_t chunks = (sh.panels * sh.panel_bytes + (int64_t{256} << 10) - 1) / (int64_t{256} << 10);
  if (chunks * blocks < num_threads())  // enough items for every thread
    chunks = std::min<int64_t>(sh.panels, (num_threads() + blocks - 1) / blocks);
  const int64_t chunk = (sh.panels + chunks - 1) / chunks;  // equal chunks
  chunks = (sh.panels + chunk - 1) / chunk;
  // Below ~1M multiply-adds a second thread costs more than it saves.
  const int64_t item_macs = chunk * kPackedRows * sh.steps * 8 * std::min(a.M, kBlockTokens);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / item_macs);
  // Weights larger than an L2 come from L3 or memory at every call: the first pass over a
  // chunk prefetches them. Smaller ones stay in cache, where the prefetches only cost (MiniLM's
  // 384 x 1536, 0.3 MiB, at 128-640 tokens: 0.92-0.97x the panel kernels with them, 1.00-1.03x
  // without).
  const bool stream = sh.panels * sh.panel_bytes > (int64_t{1} << 20);
  parallel_for(chunks * blocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t c = item / blocks, mb = item % blocks;
      const int64_t p1 = std::min(sh.panels, (c + 1) * chunk), m1 = std::min(a.M, (mb + 1) * kBlockTokens);
      for (int64_t m = mb * kBlockTokens; m < m1; m += Ker::kTokens)
        for (int64_t p = c * chunk; p < p1; ++p)
          Ker::panel(a, x, sh, panels + p * sh.panel_bytes, p * kPackedRows,
                     std::min<int64_t>(kPackedRows, a.N - p * kPackedRows), m, std::min(m1, m + Ker::kTokens),
                     stream && m == mb * kBlockTokens);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
