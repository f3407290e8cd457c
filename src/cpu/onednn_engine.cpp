#include "onednn_engine.h"

#include <atomic>
#include <pthread.h>

namespace tensorslim {
namespace cpu {
namespace {

std::atomic<bool> started{false}, unusable{false}, failed{false};

void on_fork_child() { unusable.store(started.load()); }

[[maybe_unused]] const int fork_handler_registered = pthread_atfork(nullptr, nullptr, on_fork_child);

}  // namespace

OneDnn& onednn() {
  static OneDnn e;  // created on first use: importing tensorslim starts no oneDNN runtime
  started.store(true);
  return e;
}

bool onednn_usable() {
  if (unusable.load(std::memory_order_relaxed) || failed.load(std::memory_order_relaxed))
    return false;
  try {
    onednn();
    return true;
  } catch (const dnnl::error&) {  // e.g. the SYCL runtime finds no CPU device
    failed.store(true);
    return false;
  }
}

}  // namespace cpu
}  // namespace tensorslim
