// The feature losses' inner loops on AVX2 + FMA (8 fp32 lanes); the loops are in feature_simd.h.
#include "feature_simd.h"
#include "simd_avx2.h"

namespace tensorslim {
namespace cpu {

const FeatureKernels<float>& avx2_feature_kernels() { return feature_simd::kernels<simd::Avx2>(); }

}  // namespace cpu
}  // namespace tensorslim
