// Blocked float64 Cholesky factorization and lower-triangular inverse of row-major matrices,
// for the damped inverse-Hessian factor GPTQ and SparseGPT share (hessian.cpp). Their cubic
// parts run in GPTQ's lazy-update kernels (gptq_kernels.h, AVX2 / AVX-512, every core):
// Eigen's LLT and triangular solve, compiled for the baseline ISA on one core, took 230 ms
// of a 276 ms GPTQ solve at 1536 inputs (a LLaMA down projection).
#pragma once

#include <cstdint>

namespace tensorslim {
namespace cpu {

// a [n, n] row-major, symmetric (its lower triangle is read): the lower triangle becomes L
// with L L^T = a; the strict upper triangle is overwritten. False (a partly overwritten)
// where a pivot is not positive and finite: a is not positive definite.
bool cholesky_lower(double* a, int64_t n);

// l [n, n] row-major, lower triangular with a nonzero diagonal (its upper triangle unread):
// x [n, n] row-major = l^-1, lower triangular with zeros above the diagonal.
void lower_inverse(const double* l, int64_t n, double* x);

}  // namespace cpu
}  // namespace tensorslim
