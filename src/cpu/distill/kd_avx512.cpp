// The KD inner loops on AVX-512F (16 fp32 lanes); the loops themselves are in kd_simd.h.
#include "kd_simd.h"
#include "simd_avx512.h"

namespace tensorslim {
namespace cpu {

const KdKernels& avx512_kd_kernels() { return kd_simd::kernels<simd::Avx512>(); }

}  // namespace cpu
}  // namespace tensorslim
