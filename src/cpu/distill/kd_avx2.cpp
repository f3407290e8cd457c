// The KD inner loops on AVX2 + FMA (8 fp32 lanes); the loops themselves are in kd_simd.h.
#include "kd_simd.h"
#include "simd_avx2.h"

namespace tensorslim {
namespace cpu {

const KdKernels& avx2_kd_kernels() { return kd_simd::kernels<simd::Avx2>(); }

}  // namespace cpu
}  // namespace tensorslim
