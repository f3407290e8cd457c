// panel_gemm's dispatch by the active ISA.
#include "panel_gemm.h"

#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {

bool panel_gemm_takes_bf16() { return active_isa() == Isa::kAVX512 && cpu_has_avx512_bf16(); }

bool panel_gemm(const PanelGemmProblem& p) {
  if (p.x_bf16) {
    if (!panel_gemm_takes_bf16() || !p.decode_ranges) return false;
    panel_gemm_bf16_avx512(p);
    return true;
  }
  switch (active_isa()) {
    case Isa::kAVX512: panel_gemm_avx512(p); return true;
    case Isa::kAVX2: panel_gemm_avx2(p); return true;
    default: return false;
  }
}

}  // namespace cpu
}  // namespace tensorslim
