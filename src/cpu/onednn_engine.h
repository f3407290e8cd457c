// The process's one oneDNN CPU engine and stream, shared by every oneDNN-backed kernel.
#pragma once

#include <mutex>

#include <oneapi/dnnl/dnnl.hpp>

#include "onednn_int8_exact.h"

namespace tensorslim {
namespace cpu {

struct OneDnn {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::mutex mu;  // guards the one stream and the kernels' primitive caches
};

OneDnn& onednn();

// False in a process forked after oneDNN started (the runtime threads its stream waits on
// were not copied by fork(), so a oneDNN call there would never return), and where oneDNN
// cannot create its CPU engine (its SYCL runtime finds no device). Every oneDNN-backed
// path checks this first and lets our own kernels run instead.
bool onednn_usable();

}  // namespace cpu
}  // namespace tensorslim
