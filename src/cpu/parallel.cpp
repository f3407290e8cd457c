#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <dlfcn.h>
#include <exception>
#include <mutex>
#include <system_error>
#include <pthread.h>
#include <sched.h>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace tensorslim {
namespace cpu {
namespace {

// The spin-wait hint: PAUSE on x86-64, YIELD on ARM, nothing elsewhere.
inline void spin_pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Waiting threads poll this long before they block: a futex wake-up costs ~30 us on the
// VMs we measured, more than many whole kernels, while a bounded poll cannot starve
// other work the way an open-ended spin does on an oversubscribed machine.
constexpr auto kPollFor = std::chrono::microseconds(50);

template <typename Ready>
bool poll(Ready ready) {
  const auto until = std::chrono::steady_clock::now() + kPollFor;
  for (int i = 1;; ++i) {
    if (ready()) return true;
    spin_pause();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > until) return false;
  }
}

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // never stop workers mid-region
    stop();
    stopping_.store(false, std::memory_order_release);
    // New workers start from the current generation: no region is running (run_mu_ held).
    const uint64_t now = generation_.load(std::memory_order_acquire);
    for (int i = 1; i < n; ++i) {
      try {
        workers_.emplace_back([this, i, now] { loop(i, now); });
      } catch (const std::system_error&) {
        break;  // the system refused more threads: a smaller pool still computes the same
      }
    }
  }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one parallel region at a time
    const int parts = size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &fn;
      total_ = n;
      parts_ = parts;
      pending_.store(parts - 1, std::memory_order_relaxed);
      error_ = nullptr;
      generation_.fetch_add(1, std::memory_order_release);  // publishes the fields above
    }
    cv_.notify_all();
    run_part(0);
    if (!poll([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    std::lock_guard<std::mutex> lock(mu_);
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_part(int part) {
    const int64_t chunk = (total_ + parts_ - 1) / parts_;
    const int64_t b = std::min<int64_t>(total_, part * chunk);
    const int64_t e = std::min<int64_t>(total_, b + chunk);
    if (b >= e) return;
    try {
      (*task_)(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void loop(int part, uint64_t seen) {
    auto news = [&] {
      return stopping_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen;
    };
    for (;;) {
      if (!poll(news)) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, news);
      }
      if (stopping_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      run_part(part);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // the caller checks pending_ under mu_
        done_cv_.notify_one();
      }
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_.store(true, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  int64_t total_ = 0;
  int parts_ = 1;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  std::exception_ptr error_;
};

// The CPUs this process may run on (affinity mask, e.g. taskset or a container's cpuset).
int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

int default_threads() {
  const int cpus = usable_cpus();
  if (const char* env = std::getenv("TENSORSLIM_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n > 0) return clamp_threads(n);
  }
  return cpus;
}

// The pool is made on first use. A forked child does not have the parent's workers (fork
// copies only the calling thread), so it drops the parent's pool, whose threads can never
// be joined there, and makes its own on first use.
std::atomic<Pool*> the_pool{nullptr};
std::atomic<bool> forked_child{false};

void on_fork_child() {
  the_pool.store(nullptr);  // leaked on purpose: its std::threads refer to no thread here
  forked_child.store(true);
}

[[maybe_unused]] const int fork_handler_registered = pthread_atfork(nullptr, nullptr, on_fork_child);

Pool& pool() {
  Pool* p = the_pool.load(std::memory_order_acquire);
  if (p) return *p;
  Pool* fresh = new Pool(default_threads());
  if (the_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread made one first
  return *p;
}

thread_local bool in_parallel = false;

// The libgomp ABI (also exported by LLVM's and Intel's OpenMP runtimes).
struct HostOpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*team_size)() = nullptr;
  int (*max_threads)() = nullptr;
};
std::atomic<const HostOpenMP*> host_omp{nullptr};

struct OmpRegion {
  const std::function<void(int64_t, int64_t)>* fn;
  const HostOpenMP* omp;
  int64_t n;
  std::mutex mu;
  std::exception_ptr error;
};

void omp_trampoline(void* data) {
  auto* r = static_cast<OmpRegion*>(data);
  const int64_t parts = r->omp->team_size();
  const int64_t part = r->omp->thread_num();
  const int64_t chunk = (r->n + parts - 1) / parts;
  const int64_t b = std::min(r->n, part * chunk), e = std::min(r->n, b + chunk);
  if (b >= e) return;
  in_parallel = true;
  try {
    (*r->fn)(b, e);
  } catch (...) {  // an exception must not cross the OpenMP runtime
    std::lock_guard<std::mutex> lock(r->mu);
    if (!r->error) r->error = std::current_exception();
  }
  in_parallel = false;
}

// The host's OpenMP team, except in a forked child: GNU libgomp keeps the parent's team
// there, whose threads fork did not copy, and its next region would wait for them forever.
const HostOpenMP* usable_host_omp() {
  return forked_child.load(std::memory_order_relaxed) ? nullptr : host_omp.load();
}

}  // namespace

int num_threads() {
  const HostOpenMP* omp = usable_host_omp();
  return omp ? std::max(1, omp->max_threads()) : pool().size();
}
void set_num_threads(int n) { pool().resize(clamp_threads(n)); }

int clamp_threads(long requested) {
  // More threads than usable CPUs only adds switching; thousands can exhaust the process.
  return static_cast<int>(std::max(1L, std::min<long>(requested, usable_cpus())));
}

bool in_forked_child() { return forked_child.load(std::memory_order_relaxed); }

bool use_host_openmp(const char* library_path) {
  if (!library_path || !*library_path) {
    host_omp.store(nullptr);
    return true;
  }
  void* lib = dlopen(library_path, RTLD_NOW | RTLD_NOLOAD);
  if (!lib) return false;
  static HostOpenMP omp;  // set once; the host's runtime stays loaded for the process
  HostOpenMP found;
  found.parallel = reinterpret_cast<decltype(found.parallel)>(dlsym(lib, "GOMP_parallel"));
  found.thread_num = reinterpret_cast<int (*)()>(dlsym(lib, "omp_get_thread_num"));
  found.team_size = reinterpret_cast<int (*)()>(dlsym(lib, "omp_get_num_threads"));
  found.max_threads = reinterpret_cast<int (*)()>(dlsym(lib, "omp_get_max_threads"));
  if (!found.parallel || !found.thread_num || !found.team_size || !found.max_threads) return false;
  if (!host_omp.load()) omp = found;
  host_omp.store(&omp);
  return true;
}

bool on_host_openmp() { return usable_host_omp() != nullptr; }
const char* threading_backend() { return on_host_openmp() ? "host openmp" : "own pool"; }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (in_parallel || n <= grain || num_threads() == 1) {
    fn(0, n);
    return;
  }
  if (const HostOpenMP* omp = usable_host_omp()) {
    OmpRegion region{&fn, omp, n, {}, nullptr};
    omp->parallel(omp_trampoline, &region, 0, 0);  // 0: the host's current thread count
    if (region.error) std::rethrow_exception(region.error);
    return;
  }
  pool().run(n, [&](int64_t b, int64_t e) {
    struct Flag {  // reset even when fn throws
      Flag() { in_parallel = true; }
      ~Flag() { in_parallel = false; }
    } flag;
    fn(b, e);
  });
}

}  // namespace cpu
}  // namespace tensorslim
