// The ISA-independent half of the W4A8 small-batch kernels (w4a8_gemv_avx512.cpp,
// w4a8_gemv_avx2.cpp), bit-exact with linear_w4a8_reference like the panel kernels.
//
// At a few tokens the panel kernels (w4a8_panels.h) spend most of their time transposing and
// unpacking each 16-row panel for one or two dot products per weight byte. These read the
// packed rows as stored instead. A chunk is C codes of one row: C / 2 packed bytes, one vector,
// whose low nibbles are the even k and high nibbles the odd k. Each token's s8 codes are re-laid
// per chunk as [C / 2 even k][C / 2 odd k] (zeros past K), so the chunk's two nibble halves
// multiply two activation vectors lane by lane. R rows are read side by side; at the end of each
// group their R lane-sum vectors are reduced to one vector holding row r in lane r, and the
// group's rescale (d = sum(u * q) - o * sum(q); acc = acc + float(d) * scale) runs one output per
// lane in the reference's order. Groups are whole chunks (group a multiple of C, or one group
// per row), or 32 / 64 codes that tile a chunk: their dots are the 4- / 8-lane sums the same
// lane tree passes through (GPC = C / group of them per chunk); a short last group and K's
// tail are the last chunk, zero-padded.
//
// Everything is in an anonymous namespace: each per-ISA file compiles its own copy with its
// own -m flags.
//
// A kernel type Ker provides:
//   Ker::kRows, Ker::kChunk     rows read side by side, codes per chunk
//   Ker::block(a, acts, n0, rows)   outputs [n0, n0 + rows) of every token
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

// Tokens re-laid per chunk and their per-group code sums.
struct GemvActs {
  const int8_t* q;      // [M][chunks][C]
  const int32_t* sums;  // [M][groups]
  int64_t chunks, groups;  // per row
  // The loop unit: a group of gchunks chunks (gpc 1), or one chunk holding gpc groups.
  int64_t units, gchunks, gpc;
};

inline bool w4a8_gemv_fits(int64_t K, int64_t group, int64_t chunk) {
  const bool sub_chunk = (group == 32 || group == 64) && chunk % group == 0;
  return K > 0 && (group >= K || (group > 0 && (group % chunk == 0 || sub_chunk)));
}

template <class Ker>
void w4a8_gemv_drive(const W4A8Args& a) {
  constexpr int64_t C = Ker::kChunk, R = Ker::kRows;
  GemvActs x;
  x.chunks = (a.K + C - 1) / C;
  x.groups = lowbit_groups(a.K, a.group);
  x.gpc = a.group < a.K && a.group < C ? C / a.group : 1;
  x.gchunks = a.group >= a.K ? x.chunks : std::max<int64_t>(1, a.group / C);
  x.units = x.gpc > 1 ? x.chunks : x.groups;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<int32_t> sums;
  q.assign(a.M * x.chunks * C, 0);
  sums.assign(a.M * x.groups, 0);
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* src = a.qx + m * a.K;
    int8_t* dst = q.data() + m * x.chunks * C;
    for (int64_t k = 0; k < a.K; ++k) dst[k / C * C + (k & 1) * (C / 2) + k % C / 2] = src[k];
    const int64_t gsize = std::min(a.group, a.K);
    for (int64_t g = 0; g < x.groups; ++g) {
      int32_t s = 0;
      for (int64_t k = g * gsize; k < std::min(a.K, (g + 1) * gsize); ++k) s += src[k];
      sums[m * x.groups + g] = s;
    }
  }
  x.q = q.data();
  x.sums = sums.data();
  const int64_t blocks = (a.N + R - 1) / R;
  // Below ~1M multiply-adds a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / (R * x.chunks * C * a.M));
  parallel_for(blocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t bi = b; bi < e; ++bi) Ker::block(a, x, bi * R, std::min<int64_t>(R, a.N - bi * R));
  });
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
