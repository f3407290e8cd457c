// Inner kernels of the AWQ searches, per ISA: quadratic forms of a symmetric matrix, and the
// group quantize-dequantize. awq_avx2.cpp and awq_avx512.cpp are twins: the same loops, one
// vector width each.
#pragma once

#include <cstdint>

namespace tensorslim {
namespace cpu {

// out[r] = d_r^T G d_r for the nr rows of d (row-major, leading dimension ldd, K values each)
// and G K x K (row-major, leading dimension ldg). Float products, a double sum per strip of
// columns. upper = false: G is the full symmetric matrix. upper = true: G holds the "folded"
// upper triangle (G_ii on the diagonal, 2 G_ij above it, zeros below: read only inside the
// diagonal strip blocks), the same quadratic form in half the multiply-adds (fold_upper in
// awq.cpp).
void quad_forms_avx2(const float* d, int64_t nr, int64_t K, int64_t ldd, const float* g,
                     int64_t ldg, double* out, bool upper = false);
void quad_forms_avx512(const float* d, int64_t nr, int64_t K, int64_t ldd, const float* g,
                       int64_t ldg, double* out, bool upper = false);

// Quantize-dequantize n values (one group) on the integer grid [qmin, qmax] with the group's
// range [min(v, 0), max(v, 0)] shrunk by `ratio`: the fp32 round-to-nearest rules of
// quantize.h, bit for bit the same as the scalar version in awq.cpp.
void fake_quant_avx2(const float* v, float* out, int64_t n, int32_t qmin, int32_t qmax,
                     int32_t divisor, bool symmetric, float ratio);
void fake_quant_avx512(const float* v, float* out, int64_t n, int32_t qmin, int32_t qmax,
                       int32_t divisor, bool symmetric, float ratio);

}  // namespace cpu
}  // namespace tensorslim
