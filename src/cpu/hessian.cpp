// The damped inverse-Hessian factor that GPTQ and SparseGPT share.
#include "hessian.h"

#include <algorithm>
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
  // With J the reversal permutation and J (H + damp) J = M M^T (M lower), (H + damp)^-1 =
  // (J M^-T J)(J M^-1 J): L = J M^-T J is lower with a positive diagonal, so it is the
  // Cholesky factor of the inverse. One factorization and one triangular inverse instead
  // of a factorization, a full inverse and a second factorization (a fifth of the flops).
  const int64_t n = H.rows();
  const double mean_diag = H.diagonal().mean();
  Eigen::MatrixXd M(n, n);
  for (int attempt = 0; attempt < 12; ++attempt) {
    M = H.reverse();  // J H J
    M.diagonal().array() += frac * mean_diag;
    Eigen::LLT<Eigen::Ref<Eigen::MatrixXd>> llt(M);  // in place: M's lower triangle holds the factor
    if (llt.info() == Eigen::Success) {
      // M^-1 (lower) by column panels: panel j solves M[j:, j:] X = I[j:, j:j+b], the rows
      // above it being zero; a third of the flops of one solve against the whole identity.
      L->setIdentity(n, n);
      constexpr int64_t kPanel = 128;
      for (int64_t j = 0; j < n; j += kPanel) {
        const int64_t b = std::min(kPanel, n - j);
        M.bottomRightCorner(n - j, n - j).triangularView<Eigen::Lower>().solveInPlace(
            L->block(j, j, n - j, b));
      }
      L->triangularView<Eigen::StrictlyUpper>().setZero();
      *L = L->reverse().transpose().eval();  // J M^-T J: lower
      if (L->allFinite() && (L->diagonal().array() > 0.0).all()) return frac;
    }
    frac = frac > 0.0 ? frac * 10.0 : 1e-6;
  }
  throw ValueError(std::string(op) + ": H is not positive definite even with damping " +
                   std::to_string(frac) + " x mean(diag H); check the calibration data");
}

}  // namespace cpu
}  // namespace tensorslim
