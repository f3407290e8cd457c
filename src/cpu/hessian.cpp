// The damped inverse-Hessian factor that GPTQ and SparseGPT share.
#include "hessian.h"

#include <algorithm>
#include <string>
#include <vector>

#include "blocked_cholesky.h"
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
  // In 64 x 64 tiles: H is column-major and h usually row-major, and a whole-row sweep with
  // either side strided took 18 ms at 1536 x 1536.
  for (int64_t c0 = 0; c0 < H.cols(); c0 += 64)
    for (int64_t r0 = 0; r0 < H.rows(); r0 += 64)
      for (int64_t c = c0; c < std::min<int64_t>(H.cols(), c0 + 64); ++c)
        for (int64_t r = r0; r < std::min<int64_t>(H.rows(), r0 + 64); ++r) H(r, c) = p[r * h.stride(0) + c * h.stride(1)];
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
  // of a factorization, a full inverse and a second factorization (a fifth of the flops),
  // both blocked (blocked_cholesky.h).
  const int64_t n = H.rows();
  const double mean_diag = H.diagonal().mean();
  std::vector<double> m(n * n);
  for (int attempt = 0; attempt < 12; ++attempt) {
    const double damp = frac * mean_diag;
    for (int64_t j0 = 0; j0 < n; j0 += 64)  // J H J + damp, row-major, in tiles (H is column-major)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = j0; j < std::min(n, j0 + 64); ++j) m[i * n + j] = H(n - 1 - i, n - 1 - j) + (i == j ? damp : 0.0);
    if (cholesky_lower(m.data(), n)) {
      // L(i, j) = (M^-1)(n-1-j, n-1-i): L's column-major storage is M^-1's row-major storage
      // reversed, so M^-1 is written there and reversed in place.
      L->resize(n, n);
      lower_inverse(m.data(), n, L->data());
      std::reverse(L->data(), L->data() + n * n);
      if (L->allFinite() && (L->diagonal().array() > 0.0).all()) return frac;
    }
    frac = frac > 0.0 ? frac * 10.0 : 1e-6;
  }
  throw ValueError(std::string(op) + ": H is not positive definite even with damping " +
                   std::to_string(frac) + " x mean(diag H); check the calibration data");
}

}  // namespace cpu
}  // namespace tensorslim
