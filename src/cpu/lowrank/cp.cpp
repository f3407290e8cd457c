// CP-ALS (Kolda & Bader 2009, sec. 3.4) of a 4-way conv kernel: each factor in turn is the
// least-squares fit given the other three (the tensor times the Khatri-Rao product of the
// others, divided by the Hadamard product of their Gram matrices), then normalized.
#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <array>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "dense.h"
#include "tensorslim/lowrank.h"

namespace tensorslim {
namespace {

using lowrank::Mat;

struct Tensor4 {
  std::array<int64_t, 4> dim;
  std::vector<double> v;  // row-major [O, I, kh, kw]
};

Tensor4 read_tensor(const TensorView& w) {
  const auto taps = lowrank::read_kernel(w);  // checks dtype, shape and finiteness
  Tensor4 t{{w.size(0), w.size(1), w.size(2), w.size(3)}, {}};
  t.v.resize(t.dim[0] * t.dim[1] * t.dim[2] * t.dim[3]);
  int64_t k = 0;
  for (int64_t o = 0; o < t.dim[0]; ++o)
    for (int64_t i = 0; i < t.dim[1]; ++i)
      for (int64_t y = 0; y < t.dim[2]; ++y)
        for (int64_t x = 0; x < t.dim[3]; ++x) t.v[k++] = taps[y * t.dim[3] + x](o, i);
  return t;
}

// The tensor times the Khatri-Rao product of every factor but `mode`: [dim[mode], R].
Mat<double> mttkrp(const Tensor4& t, const std::array<Mat<double>, 4>& f, int mode) {
  const int64_t R = f[0].cols();
  Mat<double> m = Mat<double>::Zero(t.dim[mode], R);
  Eigen::RowVectorXd prod(R);
  int64_t k = 0;
  std::array<int64_t, 4> idx{};
  for (idx[0] = 0; idx[0] < t.dim[0]; ++idx[0])
    for (idx[1] = 0; idx[1] < t.dim[1]; ++idx[1])
      for (idx[2] = 0; idx[2] < t.dim[2]; ++idx[2])
        for (idx[3] = 0; idx[3] < t.dim[3]; ++idx[3]) {
          const double val = t.v[k++];
          if (val == 0.0) continue;
          prod.setConstant(val);
          for (int q = 0; q < 4; ++q)
            if (q != mode) prod.array() *= f[q].row(idx[q]).array();
          m.row(idx[mode]) += prod;
        }
  return m;
}

double relative_error(const Tensor4& t, const std::array<Mat<double>, 4>& f) {
  double err2 = 0.0, norm2 = 0.0;
  int64_t k = 0;
  std::array<int64_t, 4> idx{};
  for (idx[0] = 0; idx[0] < t.dim[0]; ++idx[0])
    for (idx[1] = 0; idx[1] < t.dim[1]; ++idx[1])
      for (idx[2] = 0; idx[2] < t.dim[2]; ++idx[2])
        for (idx[3] = 0; idx[3] < t.dim[3]; ++idx[3]) {
          const double approx = (f[0].row(idx[0]).array() * f[1].row(idx[1]).array() *
                                 f[2].row(idx[2]).array() * f[3].row(idx[3]).array()).sum();
          const double val = t.v[k++];
          err2 += (val - approx) * (val - approx);
          norm2 += val * val;
        }
  return norm2 > 0.0 ? std::sqrt(err2 / norm2) : 0.0;
}

// Leading eigenvectors of the mode's Gram matrix for the first columns, Gaussian for the rest.
Mat<double> initial_factor(const Tensor4& t, int mode, int64_t R, std::mt19937_64* gen) {
  const int64_t n = t.dim[mode];
  Mat<double> unfold(n, static_cast<int64_t>(t.v.size()) / n);
  std::vector<int64_t> col(n, 0);
  int64_t k = 0;
  std::array<int64_t, 4> idx{};
  for (idx[0] = 0; idx[0] < t.dim[0]; ++idx[0])
    for (idx[1] = 0; idx[1] < t.dim[1]; ++idx[1])
      for (idx[2] = 0; idx[2] < t.dim[2]; ++idx[2])
        for (idx[3] = 0; idx[3] < t.dim[3]; ++idx[3]) unfold(idx[mode], col[idx[mode]]++) = t.v[k++];
  Eigen::SelfAdjointEigenSolver<Mat<double>> es(unfold * unfold.transpose());
  std::normal_distribution<double> normal(0.0, 1.0);
  Mat<double> f(n, R);
  for (int64_t r = 0; r < R; ++r) {
    if (r < n) {
      f.col(r) = es.eigenvectors().col(n - 1 - r);
    } else {
      for (int64_t j = 0; j < n; ++j) f(j, r) = normal(*gen);
      f.col(r).normalize();
    }
  }
  return f;
}

void check_factor(const TensorView& v, int64_t rows, int64_t R, const char* what) {
  check_ndim(v, 2, what);
  TS_CHECK_VALUE(v.size(0) == rows && v.size(1) == R,
                 std::string("cp_als: ") + what + " must be [" + std::to_string(rows) + ", " +
                     std::to_string(R) + "], got " + shape_str(v));
}

}  // namespace

double cp_als(const TensorView& w, int iters, uint64_t seed, const TensorView& a,
              const TensorView& b, const TensorView& c, const TensorView& d) {
  const Tensor4 t = read_tensor(w);
  check_ndim(a, 2, "a");
  const int64_t R = a.size(1);
  TS_CHECK_VALUE(R >= 1, "cp_als: rank must be >= 1");
  TS_CHECK_VALUE(iters >= 1, "cp_als: iters must be >= 1");
  const TensorView* outs[4] = {&a, &b, &c, &d};
  const char* names[4] = {"a", "b", "c", "d"};
  for (int q = 0; q < 4; ++q) check_factor(*outs[q], t.dim[q], R, names[q]);

  std::mt19937_64 gen(seed);
  std::array<Mat<double>, 4> f;
  for (int q = 0; q < 4; ++q) f[q] = initial_factor(t, q, R, &gen);
  Eigen::VectorXd lambda = Eigen::VectorXd::Ones(R);
  double prev = 2.0;
  for (int it = 0; it < iters; ++it) {
    for (int mode = 0; mode < 4; ++mode) {
      Mat<double> v = Mat<double>::Ones(R, R);
      for (int q = 0; q < 4; ++q)
        if (q != mode) v.array() *= (f[q].transpose() * f[q]).array();
      // A tiny ridge keeps the solve defined when two components coincide.
      v.diagonal().array() += 1e-12 * v.trace() / R + 1e-300;
      f[mode] = v.ldlt().solve(mttkrp(t, f, mode).transpose()).transpose();
      lambda = f[mode].colwise().norm().transpose();
      for (int64_t r = 0; r < R; ++r)
        if (lambda(r) > 0.0) f[mode].col(r) /= lambda(r);
    }
    // Stop when a sweep no longer improves the fit noticeably.
    std::array<Mat<double>, 4> g = f;
    g[0] = g[0] * lambda.asDiagonal();
    const double err = relative_error(t, g);
    if (prev - err < 1e-6) break;
    prev = err;
  }
  f[0] = f[0] * lambda.asDiagonal();
  for (int q = 0; q < 4; ++q) lowrank::write2(f[q], *outs[q], names[q]);
  return relative_error(t, f);
}

}  // namespace tensorslim
