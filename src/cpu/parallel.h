// A small persistent thread pool for the CPU kernels. Our own rather than OpenMP
// so we do not load a second OpenMP runtime beside torch's and oneDNN's.
#pragma once

#include <cstdint>
#include <functional>

namespace tensorslim {
namespace cpu {

int num_threads();
void set_num_threads(int n);

// Calls fn(begin, end) on disjoint chunks covering [0, n), in parallel when n is
// larger than `grain`. Exceptions thrown by fn are rethrown on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpu
}  // namespace tensorslim
