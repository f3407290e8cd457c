// Threads for the CPU kernels. By default a small persistent pool of our own with
// blocking waits (we never load an OpenMP runtime ourselves). use_host_openmp() can make
// our parallel regions run on the host's OpenMP team (torch's libgomp) instead, so kernels
// and torch ops share one set of threads; that only pays on an idle machine, since the
// runtime's busy-waiting barrier degrades badly when cores are oversubscribed.
#pragma once

#include <cstdint>
#include <functional>

namespace tensorslim {
namespace cpu {

int num_threads();
// Sets the pool size, clamped to 1 .. the CPUs this process may use (sched_getaffinity).
void set_num_threads(int n);
int clamp_threads(long requested);
// True in a process forked from one that had loaded this library.
bool in_forked_child();

// Runs parallel regions on the OpenMP runtime loaded from `library_path` (already loaded
// by the host; it is not loaded anew). Returns false, changing nothing, if the library is
// not loaded or lacks the GOMP entry points. An empty path goes back to our own pool.
bool use_host_openmp(const char* library_path);
const char* threading_backend();  // "own pool" or "host openmp"
bool on_host_openmp();             // threading_backend() is "host openmp"

// Calls fn(begin, end) on disjoint chunks covering [0, n), in parallel when n is
// larger than `grain`. Exceptions thrown by fn are rethrown on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpu
}  // namespace tensorslim
