// SVD-LLM's truncation-aware whitening: with X^T X = L L^T, the output error of a low-rank
// W' on the calibration inputs equals ||(W - W') L||_F, so truncating the SVD of W L is the
// optimal rank-k choice for that error; the right factor is then mapped back by L^-1.
#include <Eigen/Cholesky>
#include <cmath>
#include <string>

#include "dense.h"
#include "tensorslim/lowrank.h"

namespace tensorslim {

double whiten(const TensorView& w, const TensorView& g, double damp, const TensorView& wl,
              const TensorView& l) {
  const lowrank::Mat<double> W = lowrank::read2<double>(w, "w");
  const lowrank::Mat<double> G = lowrank::read2<double>(g, "g");
  const int64_t n = W.cols();
  TS_CHECK_VALUE(G.rows() == n && G.cols() == n,
                 "whiten: g must be [" + std::to_string(n) + ", " + std::to_string(n) +
                     "] (one row per input feature), got " + shape_str(g));
  TS_CHECK_VALUE(damp >= 0.0 && std::isfinite(damp), "whiten: damp must be a finite number >= 0");
  // Inputs that never fire would make G singular; the mean diagonal keeps damping scaled.
  double mean_diag = G.diagonal().mean();
  if (!(mean_diag > 0.0)) mean_diag = 1.0;
  double frac = damp;
  for (int attempt = 0; attempt < 12; ++attempt) {
    lowrank::Mat<double> A = G;
    A.diagonal().array() += frac * mean_diag;
    Eigen::LLT<lowrank::Mat<double>> llt(A);
    if (llt.info() == Eigen::Success) {
      const lowrank::Mat<double> L = llt.matrixL();
      lowrank::write2(L, l, "l");
      lowrank::write2(W * L.triangularView<Eigen::Lower>(), wl, "wl");
      return frac;
    }
    frac = frac > 0.0 ? frac * 10.0 : 1e-6;
  }
  throw ValueError("whiten: X^T X is not positive definite even with damping " +
                   std::to_string(frac) + " x mean(diag); check the calibration data");
}

void unwhiten(const TensorView& vt, const TensorView& l, const TensorView& out) {
  const lowrank::Mat<double> V = lowrank::read2<double>(vt, "vt");
  const lowrank::Mat<double> L = lowrank::read2<double>(l, "l");
  TS_CHECK_VALUE(L.rows() == V.cols() && L.cols() == V.cols(),
                 "unwhiten: l must be [" + std::to_string(V.cols()) + ", " +
                     std::to_string(V.cols()) + "], got " + shape_str(l));
  // out L = vt  <=>  L^T out^T = vt^T: one triangular solve, no inverse formed.
  lowrank::Mat<double> res = V.transpose();
  L.transpose().triangularView<Eigen::Upper>().solveInPlace(res);
  lowrank::write2(res.transpose(), out, "out");
}

}  // namespace tensorslim
