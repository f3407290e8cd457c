// Truncated SVD of a weight matrix: Eigen's divide-and-conquer SVD for the exact one, a
// sketch-and-project randomized SVD for large matrices where only the leading k are needed.
#include <Eigen/SVD>
#include <algorithm>
#include <random>
#include <string>

#include "dense.h"
#include "tensorslim/lowrank.h"

namespace tensorslim {
namespace {

using lowrank::Mat;

template <typename T>
void exact(const TensorView& w, const TensorView& u, const TensorView& s, const TensorView& vt) {
  const Mat<T> a = lowrank::read2<T>(w, "w");
  Eigen::BDCSVD<Mat<T>> svd(a, Eigen::ComputeThinU | Eigen::ComputeThinV);
  TS_CHECK_VALUE(svd.info() == Eigen::Success, "svd: the decomposition did not converge");
  lowrank::write2(svd.matrixU(), u, "u");
  lowrank::write1(svd.singularValues(), s, "s");
  lowrank::write2(svd.matrixV().transpose(), vt, "vt");
}

// Q of a thin QR of y (an orthonormal basis of its columns), in place.
void orthonormalize(Mat<float>* y) {
  Eigen::HouseholderQR<Mat<float>> qr(*y);
  *y = qr.householderQ() * Mat<float>::Identity(y->rows(), y->cols());
}

}  // namespace

void svd_exact(const TensorView& w, bool double_precision, const TensorView& u,
               const TensorView& s, const TensorView& vt) {
  check_ndim(w, 2, "w");
  TS_CHECK_VALUE(w.size(0) > 0 && w.size(1) > 0, "svd: w is empty " + shape_str(w));
  if (double_precision)
    exact<double>(w, u, s, vt);
  else
    exact<float>(w, u, s, vt);
}

void svd_randomized(const TensorView& w, int64_t oversample, int power_iters, uint64_t seed,
                    const TensorView& u, const TensorView& s, const TensorView& vt) {
  check_ndim(w, 2, "w");
  check_ndim(s, 1, "s");
  const int64_t m = w.size(0), n = w.size(1), k = s.size(0);
  TS_CHECK_VALUE(m > 0 && n > 0, "svd_randomized: w is empty " + shape_str(w));
  TS_CHECK_VALUE(k >= 1 && k <= std::min(m, n),
                 "svd_randomized: rank " + std::to_string(k) + " must be in 1..min(m, n) = " +
                     std::to_string(std::min(m, n)));
  TS_CHECK_VALUE(oversample >= 0 && power_iters >= 0,
                 "svd_randomized: oversample and power_iters must be >= 0");
  const Mat<float> a = lowrank::read2<float>(w, "w");
  const int64_t l = std::min(k + oversample, std::min(m, n));

  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Mat<float> omega(n, l);
  for (int64_t j = 0; j < l; ++j)
    for (int64_t i = 0; i < n; ++i) omega(i, j) = normal(gen);

  Mat<float> y = a * omega;  // [m, l]: spans the dominant column space
  orthonormalize(&y);
  // Power iterations sharpen the spectrum (sigma^(2q+1)); re-orthonormalizing each half step
  // keeps the small singular directions from drowning in rounding.
  for (int it = 0; it < power_iters; ++it) {
    Mat<float> z = a.transpose() * y;  // [n, l]
    orthonormalize(&z);
    y.noalias() = a * z;
    orthonormalize(&y);
  }
  const Mat<float> b = y.transpose() * a;  // [l, n], small
  Eigen::BDCSVD<Mat<float>> svd(b, Eigen::ComputeThinU | Eigen::ComputeThinV);
  TS_CHECK_VALUE(svd.info() == Eigen::Success, "svd_randomized: the decomposition did not converge");
  const Mat<float> uk = y * svd.matrixU().leftCols(k);
  lowrank::write2(uk, u, "u");
  lowrank::write1(svd.singularValues().head(k), s, "s");
  lowrank::write2(svd.matrixV().leftCols(k).transpose(), vt, "vt");
}

}  // namespace tensorslim
