// Stand-in for src/cpu/gemm_onednn.cpp in the standalone CUDA build (build_standalone.sh),
// which links the core without oneDNN (a GPU machine may not have it): "no oneDNN
// implementation", so the CPU GEMM falls back to its other paths. The CUDA tests and the
// benchmark never call the CPU GEMM; they only need check_linear_args from gemm.cpp.
#include "tensorslim/gemm.h"

namespace tensorslim {
namespace cpu {

bool linear_weight_only_onednn(const TensorView&, const TensorView&, const TensorView&,
                               const TensorView*, const TensorView*, Format, int64_t,
                               const TensorView&) {
  return false;
}

}  // namespace cpu
}  // namespace tensorslim
