// What GPTQ and SparseGPT share: the layer's weight and Hessian as float64 Eigen matrices,
// the treatment of inputs that never fire, and the damped inverse-Hessian factor.
#pragma once

#include <Eigen/Dense>

#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace cpu {

using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// w [rows, cols] f32 (any strides) as a float64 row-major matrix; NaN/Inf is a ValueError.
RowMat load_weight(const TensorView& w, const char* op);
// h [cols, cols] f32 as float64; NaN/Inf is a ValueError.
Eigen::MatrixXd load_hessian(const TensorView& h, const char* op);
// Inputs that never fire (H_cc == 0) carry no information: their weights become zero and
// H_cc = 1 keeps H invertible.
void drop_dead_inputs(Eigen::MatrixXd* H, RowMat* W);

// Lower Cholesky factor L of (H + frac * mean(diag H) * I)^-1, so that U = L^T is the upper
// factor GPTQ uses (column j of L is row j of U, contiguous). frac is raised x10 until both
// factorizations succeed; returns the fraction used (a ValueError naming `op` after 12 tries).
double inverse_cholesky(const Eigen::MatrixXd& H, double frac, Eigen::MatrixXd* L, const char* op);

}  // namespace cpu
}  // namespace tensorslim
