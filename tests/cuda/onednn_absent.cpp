// Stand-in for src/cpu/gemm_onednn.cpp and onednn_engine.cpp in the standalone CUDA build
// (build_standalone.sh), which links the core without oneDNN (a GPU machine may not have
// it): "no oneDNN implementation" and "not usable", so the CPU GEMM falls back to its other
// paths. The CUDA tests and the benchmark never call the CPU GEMM; they only need
// check_linear_args from gemm.cpp.
#include "onednn_usable.h"
#include "tensorslim/gemm.h"

namespace tensorslim {
namespace cpu {

bool linear_weight_only_onednn(const TensorView&, const TensorView&, const TensorView&,
                               const TensorView*, const TensorView*, Format, int64_t,
                               const TensorView&) {
  return false;
}

bool onednn_usable() { return false; }

}  // namespace cpu
}  // namespace tensorslim
