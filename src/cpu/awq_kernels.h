// Inner kernel of the AWQ searches: quadratic forms of a symmetric matrix, per ISA.
#pragma once

#include <cstdint>

namespace tensorslim {
namespace cpu {

// out[r] = d_r^T G d_r for the nr rows of d (row-major, leading dimension ldd, K values each)
// and G K x K symmetric (row-major, leading dimension ldg). AVX2 + FMA, float products with a
// double sum per 16-column strip.
void quad_forms_avx2(const float* d, int64_t nr, int64_t K, int64_t ldd, const float* g,
                     int64_t ldg, double* out);

// Quantize-dequantize n values (one group) on the integer grid [qmin, qmax] with the group's
// range [min(v, 0), max(v, 0)] shrunk by `ratio`: the fp32 round-to-nearest rules of
// quantize.h, bit for bit the same as the scalar version in awq.cpp.
void fake_quant_avx2(const float* v, float* out, int64_t n, int32_t qmin, int32_t qmax,
                     int32_t divisor, bool symmetric, float ratio);

}  // namespace cpu
}  // namespace tensorslim
