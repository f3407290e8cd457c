// Inner kernels of GPTQ's column loop, per ISA (gptq_avx2.cpp and gptq_avx512.cpp are twins:
// the same loops, one vector width each). Float64 throughout, as the reference.
#pragma once

#include <cstdint>

namespace tensorslim {
namespace cpu {

// The lazy batch update: c[r, j] -= sum_t e[r, t] * u[t, j] for r < m, j < n, t < k, with
// c row-major (leading dimension ldc), e row-major (lde) and u row-major (ldu: row t of u is
// column t of the inverse-Hessian factor, contiguous).
void gptq_update_avx2(double* c, int64_t ldc, const double* e, int64_t lde, const double* u,
                      int64_t ldu, int64_t m, int64_t n, int64_t k);
void gptq_update_avx512(double* c, int64_t ldc, const double* e, int64_t lde, const double* u,
                        int64_t ldu, int64_t m, int64_t n, int64_t k);

// y[j] -= a * x[j], j < n: one column's error pushed onto the rest of its block.
void gptq_axpy_avx2(double* y, const double* x, double a, int64_t n);
void gptq_axpy_avx512(double* y, const double* x, double a, int64_t n);

}  // namespace cpu
}  // namespace tensorslim
