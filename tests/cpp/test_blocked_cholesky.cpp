// The blocked Cholesky factorization and lower-triangular inverse (src/cpu/blocked_cholesky.h)
// against Eigen's, on every ISA (scalar, AVX2, AVX-512 update kernels), at sizes around the
// 48-column panels, and the damped inverse-Hessian factor built from them.
#include <gtest/gtest.h>

#include <Eigen/Dense>
#include <cmath>
#include <random>
#include <vector>

#include "blocked_cholesky.h"
#include "hessian.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::IsaScope;
using testing::machine_isas;

// A symmetric positive definite matrix with a condition number around 1e4 (as damped
// Hessians of real activations have).
Eigen::MatrixXd spd(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd x(n, n + 7);
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  Eigen::MatrixXd a = x * x.transpose() / double(n);
  a.diagonal().array() += 1e-3;
  return a;
}

double max_abs(const Eigen::MatrixXd& m) { return m.cwiseAbs().maxCoeff(); }

TEST(BlockedCholesky, FactorAndInverseMatchEigenOnEveryIsa) {
  for (cpu::Isa isa : machine_isas()) {
    IsaScope scope(isa);
    for (int64_t n : {1, 2, 5, 47, 48, 49, 96, 97, 130, 301}) {
      const Eigen::MatrixXd a = spd(n, 3 + static_cast<uint32_t>(n));
      const Eigen::MatrixXd ref = a.llt().matrixL();
      std::vector<double> m(n * n);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) m[i * n + j] = a(i, j);
      ASSERT_TRUE(cpu::cholesky_lower(m.data(), n)) << n;
      Eigen::MatrixXd got = Eigen::MatrixXd::Zero(n, n);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j <= i; ++j) got(i, j) = m[i * n + j];
      EXPECT_LT(max_abs(got - ref), 1e-11 * max_abs(ref)) << cpu::isa_name(isa) << " n " << n;

      std::vector<double> x(n * n, 7.0);
      cpu::lower_inverse(m.data(), n, x.data());
      Eigen::MatrixXd inv(n, n);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) inv(i, j) = x[i * n + j];
      const Eigen::MatrixXd ref_inv = ref.triangularView<Eigen::Lower>().solve(Eigen::MatrixXd::Identity(n, n));
      EXPECT_LT(max_abs(inv - ref_inv), 1e-10 * max_abs(ref_inv)) << cpu::isa_name(isa) << " n " << n;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = i + 1; j < n; ++j) ASSERT_EQ(inv(i, j), 0.0) << "upper triangle written, n " << n;
    }
  }
}

TEST(BlockedCholesky, NotPositiveDefiniteIsFalse) {
  for (cpu::Isa isa : machine_isas()) {
    IsaScope scope(isa);
    for (int64_t n : {3, 60, 150}) {
      Eigen::MatrixXd a = spd(n, 9);
      a(n - 2, n - 2) = -1.0;  // a pivot in the last panel turns negative
      std::vector<double> m(n * n);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) m[i * n + j] = a(i, j);
      EXPECT_FALSE(cpu::cholesky_lower(m.data(), n)) << n;
      m.assign(n * n, 0.0);
      for (int64_t i = 0; i < n; ++i) m[i * n + i] = i == 0 ? std::nan("") : 1.0;
      EXPECT_FALSE(cpu::cholesky_lower(m.data(), n)) << "NaN pivot, n " << n;
    }
  }
}

// The damped inverse-Hessian factor: L L^T = (H + damp * mean(diag H) * I)^-1, L lower with a
// positive diagonal (its definition in hessian.h), for H below and above one panel.
TEST(BlockedCholesky, InverseHessianFactorIsTheFactorOfTheDampedInverse) {
  for (cpu::Isa isa : machine_isas()) {
    IsaScope scope(isa);
    for (int64_t n : {7, 48, 200}) {
      const Eigen::MatrixXd h = spd(n, 21 + static_cast<uint32_t>(n));
      Eigen::MatrixXd l;
      const double frac = cpu::inverse_cholesky(h, 0.01, &l, "test");
      EXPECT_EQ(frac, 0.01);
      Eigen::MatrixXd damped = h;
      damped.diagonal().array() += 0.01 * h.diagonal().mean();
      const Eigen::MatrixXd want = damped.inverse();
      EXPECT_LT(max_abs(l * l.transpose() - want), 1e-10 * max_abs(want)) << cpu::isa_name(isa) << " n " << n;
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_GT(l(i, i), 0.0);
        for (int64_t j = i + 1; j < n; ++j) ASSERT_EQ(l(i, j), 0.0);
      }
    }
  }
}

}  // namespace
}  // namespace tensorslim
