// Threads for the CPU kernels. By default a small persistent pool of our own (we never
// load an OpenMP runtime ourselves). When the host process already runs one (torch's
// libgomp), use_host_openmp() makes our parallel regions run on its team instead, so
// our kernels and torch's ops share one set of threads rather than fighting over cores
// (an idle OpenMP worker busy-waits for a while after each torch op).
#pragma once

#include <cstdint>
#include <functional>

namespace tensorslim {
namespace cpu {

int num_threads();
void set_num_threads(int n);

// Runs parallel regions on the OpenMP runtime loaded from `library_path` (already loaded
// by the host; it is not loaded anew). Returns false, changing nothing, if the library is
// not loaded or lacks the GOMP entry points. An empty path goes back to our own pool.
bool use_host_openmp(const char* library_path);
const char* threading_backend();  // "own pool" or "host openmp"

// Calls fn(begin, end) on disjoint chunks covering [0, n), in parallel when n is
// larger than `grain`. Exceptions thrown by fn are rethrown on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpu
}  // namespace tensorslim
