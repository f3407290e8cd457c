// The damped inverse-Hessian factor that GPTQ and SparseGPT share.
#include "hessian.h"

#include <string>

#include "tensorslim/status.h"

namespace tensorslim {
namespace cpu {

RowMat load_weight(const TensorView& w, const char* op) {
  RowMat W(w.size(0), w.size(1));
  const float* p = w.ptr<float>();
  for (int64_t r = 0; r < W.rows(); ++r)
    for (int64_t c = 0; c < W.cols(); ++c) W(r, c) = p[r * w.stride(0) + c * w.stride(1)];
  TS_CHECK_VALUE(W.allFinite(), std::string(op) + ": w contains NaN or Inf");
  return W;
}

Eigen::MatrixXd load_hessian(const TensorView& h, const char* op) {
  Eigen::MatrixXd H(h.size(0), h.size(1));
  const float* p = h.ptr<float>();
  for (int64_t r = 0; r < H.rows(); ++r)
    for (int64_t c = 0; c < H.cols(); ++c) H(r, c) = p[r * h.stride(0) + c * h.stride(1)];
  TS_CHECK_VALUE(H.allFinite(), std::string(op) + ": h contains NaN or Inf");
  return H;
}

void drop_dead_inputs(Eigen::MatrixXd* H, RowMat* W) {
  for (int64_t c = 0; c < H->cols(); ++c) {
    if ((*H)(c, c) == 0.0) {
      (*H)(c, c) = 1.0;
      W->col(c).setZero();
    }
  }
}

double inverse_cholesky(const Eigen::MatrixXd& H, double frac, Eigen::MatrixXd* L, const char* op) {
  const int64_t n = H.rows();
  const double mean_diag = H.diagonal().mean();
  Eigen::MatrixXd scratch(n, n);
  for (int attempt = 0; attempt < 12; ++attempt) {
    *L = H;
    L->diagonal().array() += frac * mean_diag;
    Eigen::LLT<Eigen::Ref<Eigen::MatrixXd>> llt(*L);  // in place: *L holds the factor
    if (llt.info() == Eigen::Success) {
      scratch.setIdentity();
      llt.matrixL().solveInPlace(scratch);                                  // C^-1
      L->noalias() = scratch.transpose() * scratch;                        // (H + damp)^-1
      L->triangularView<Eigen::StrictlyUpper>() = L->transpose();          // exact symmetry
      Eigen::LLT<Eigen::Ref<Eigen::MatrixXd>> llt_inv(*L);
      if (llt_inv.info() == Eigen::Success) {
        L->triangularView<Eigen::StrictlyUpper>().setZero();
        return frac;
      }
    }
    frac = frac > 0.0 ? frac * 10.0 : 1e-6;
  }
  throw ValueError(std::string(op) + ": H is not positive definite even with damping " +
                   std::to_string(frac) + " x mean(diag H); check the calibration data");
}

}  // namespace cpu
}  // namespace tensorslim
