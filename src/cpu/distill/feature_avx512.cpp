// The feature losses' inner loops on AVX-512F (16 fp32 lanes); the loops are in feature_simd.h.
#include "feature_simd.h"
#include "simd_avx512.h"

namespace tensorslim {
namespace cpu {

const FeatureKernels<float>& avx512_feature_kernels() { return feature_simd::kernels<simd::Avx512>(); }

}  // namespace cpu
}  // namespace tensorslim
