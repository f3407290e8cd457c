// panel_gemm's dispatch by the active ISA.
#include "panel_gemm.h"

#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {

bool panel_gemm(const PanelGemmProblem& p) {
  switch (active_isa()) {
    case Isa::kAVX512: panel_gemm_avx512(p); return true;
    case Isa::kAVX2: panel_gemm_avx2(p); return true;
    default: return false;
  }
}

}  // namespace cpu
}  // namespace tensorslim
