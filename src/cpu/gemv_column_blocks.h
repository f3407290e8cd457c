// How the INT8 GEMV kernels (AVX2 and AVX-512 VNNI) share out a weight: blocks of 16 weight
// rows per task, big enough to amortize a task, small enough to spread a GEMV over the
// threads; every activation row runs over a block while it sits in L2.
#pragma once

#include <algorithm>
#include <cstdint>

#include "parallel.h"

namespace tensorslim {
namespace cpu {

constexpr int64_t kGemvColumnBlock = 16;

// Calls fn(n0, n1) for each block [n0, n1) of the N weight rows, in parallel; M x K is the
// activation the block multiplies.
template <class Fn>
void for_each_column_block(int64_t N, int64_t M, int64_t K, const Fn& fn) {
  const int64_t blocks = (N + kGemvColumnBlock - 1) / kGemvColumnBlock;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, M * K * kGemvColumnBlock));
  parallel_for(blocks, grain, [&](int64_t bb, int64_t be) {
    for (int64_t blk = bb; blk < be; ++blk)
      fn(blk * kGemvColumnBlock, std::min(N, (blk + 1) * kGemvColumnBlock));
  });
}

}  // namespace cpu
}  // namespace tensorslim
