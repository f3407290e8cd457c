// The process's one oneDNN CPU engine and stream, shared by every oneDNN-backed kernel.
#pragma once

#include <mutex>

#include <oneapi/dnnl/dnnl.hpp>

#include "onednn_int8_exact.h"
#include "onednn_usable.h"

namespace tensorslim {
namespace cpu {

struct OneDnn {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::mutex mu;  // guards the one stream and the kernels' primitive caches
};

OneDnn& onednn();

}  // namespace cpu
}  // namespace tensorslim
