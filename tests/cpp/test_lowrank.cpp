// Low-rank cores against what linear algebra guarantees: the SVD reconstructs w with
// orthonormal factors, truncation error is the Eckart-Young tail, the randomized SVD stays
// within a small factor of it, whitening inverts exactly, Tucker-2 / CP recover kernels of
// exactly that rank; bad arguments are ValueErrors.
#include <gtest/gtest.h>

#include <Eigen/Dense>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "tensorslim/lowrank.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::view1;
using testing::view2;
using testing::view4;
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A [m, n] matrix with singular values decaying like 1 / (1 + j)^decay.
MatF decaying(int64_t m, int64_t n, double decay, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  MatD a(m, m), b(n, n);
  for (int64_t i = 0; i < a.size(); ++i) a.data()[i] = normal(gen);
  for (int64_t i = 0; i < b.size(); ++i) b.data()[i] = normal(gen);
  const MatD q1 = Eigen::HouseholderQR<MatD>(a).householderQ();
  const MatD q2 = Eigen::HouseholderQR<MatD>(b).householderQ();
  const int64_t k = std::min(m, n);
  MatD s = MatD::Zero(m, n);
  for (int64_t j = 0; j < k; ++j) s(j, j) = 1.0 / std::pow(1.0 + j, decay);
  return (q1 * s * q2.transpose()).cast<float>();
}

struct Svd {
  MatF u, vt;
  Eigen::VectorXf s;
};

Svd run_exact(MatF& w, bool dp) {
  const int64_t m = w.rows(), n = w.cols(), k = std::min(m, n);
  Svd r{MatF(m, k), MatF(k, n), Eigen::VectorXf(k)};
  svd_exact(view2(w.data(), DType::kFloat32, m, n), dp, view2(r.u.data(), DType::kFloat32, m, k),
            view1(r.s.data(), DType::kFloat32, k), view2(r.vt.data(), DType::kFloat32, k, n));
  return r;
}

double truncation_error(const MatF& w, const Svd& f, int64_t k) {
  const MatF approx = f.u.leftCols(k) * f.s.head(k).asDiagonal() * f.vt.topRows(k);
  return (w - approx).cast<double>().norm();
}

TEST(LowRank, ExactSvdReconstructsWithOrthonormalFactors) {
  for (bool dp : {false, true}) {
    for (auto shape : {std::make_pair(40, 25), std::make_pair(25, 40)}) {
      MatF w = decaying(shape.first, shape.second, 0.5, 1);
      const Svd f = run_exact(w, dp);
      const int64_t k = f.s.size();
      EXPECT_LT(truncation_error(w, f, k) / w.norm(), 1e-5);
      EXPECT_LT((f.u.transpose() * f.u - MatF::Identity(k, k)).norm(), 1e-4);
      EXPECT_LT((f.vt * f.vt.transpose() - MatF::Identity(k, k)).norm(), 1e-4);
      for (int64_t j = 1; j < k; ++j) EXPECT_GE(f.s(j - 1), f.s(j));
    }
  }
}

TEST(LowRank, TruncationErrorIsTheEckartYoungTail) {
  MatF w = decaying(64, 48, 1.0, 2);
  const Svd f = run_exact(w, false);
  for (int64_t k : {1, 8, 30}) {
    const double tail = f.s.tail(f.s.size() - k).cast<double>().norm();
    EXPECT_NEAR(truncation_error(w, f, k), tail, 1e-4 * w.norm());
  }
}

TEST(LowRank, RandomizedSvdIsCloseToTheExactTruncation) {
  MatF w = decaying(300, 200, 1.0, 3);
  const Svd exact = run_exact(w, true);
  for (int64_t k : {10, 40}) {
    Svd r{MatF(300, k), MatF(k, 200), Eigen::VectorXf(k)};
    svd_randomized(view2(w.data(), DType::kFloat32, 300, 200), 10, 2, 7,
                   view2(r.u.data(), DType::kFloat32, 300, k), view1(r.s.data(), DType::kFloat32, k),
                   view2(r.vt.data(), DType::kFloat32, k, 200));
    const double best = truncation_error(w, exact, k);
    EXPECT_LT(truncation_error(w, r, k), 1.05 * best) << "rank " << k;
    EXPECT_NEAR(r.s(0), exact.s(0), 1e-4);
  }
}

TEST(LowRank, WhiteningInvertsExactly) {
  const int64_t m = 12, n = 20, N = 64;
  std::mt19937 gen(4);
  std::normal_distribution<float> normal;
  MatF w(m, n), x(N, n);
  for (int64_t i = 0; i < w.size(); ++i) w.data()[i] = normal(gen);
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  MatF g = x.transpose() * x / N;
  MatF wl(m, n), l(n, n), back(m, n);
  const double used = whiten(view2(w.data(), DType::kFloat32, m, n), view2(g.data(), DType::kFloat32, n, n),
                             0.0, view2(wl.data(), DType::kFloat32, m, n), view2(l.data(), DType::kFloat32, n, n));
  EXPECT_EQ(used, 0.0);
  EXPECT_LT((l * l.transpose() - g).norm() / g.norm(), 1e-5);
  EXPECT_LT((wl - w * l).norm() / wl.norm(), 1e-5);
  unwhiten(view2(wl.data(), DType::kFloat32, m, n), view2(l.data(), DType::kFloat32, n, n),
           view2(back.data(), DType::kFloat32, m, n));
  EXPECT_LT((back - w).norm() / w.norm(), 1e-4);
}

TEST(LowRank, WhiteningDampsASingularGram) {
  const int64_t n = 6;
  MatF w = MatF::Ones(2, n), g = MatF::Zero(n, n), wl(2, n), l(n, n);
  g(0, 0) = 1.0f;  // five inputs never fire
  const double used = whiten(view2(w.data(), DType::kFloat32, 2, n), view2(g.data(), DType::kFloat32, n, n),
                             0.0, view2(wl.data(), DType::kFloat32, 2, n), view2(l.data(), DType::kFloat32, n, n));
  EXPECT_GT(used, 0.0);
}

// A kernel of exact multilinear rank (ro, ri) in its channel modes.
std::vector<float> tucker_kernel(int64_t O, int64_t I, int64_t K, int64_t ro, int64_t ri) {
  std::mt19937 gen(5);
  std::normal_distribution<double> normal;
  MatD u(O, ro), v(I, ri);
  for (int64_t i = 0; i < u.size(); ++i) u.data()[i] = normal(gen);
  for (int64_t i = 0; i < v.size(); ++i) v.data()[i] = normal(gen);
  std::vector<float> w(O * I * K);
  for (int64_t t = 0; t < K; ++t) {
    MatD c(ro, ri);
    for (int64_t i = 0; i < c.size(); ++i) c.data()[i] = normal(gen);
    const MatD tap = u * c * v.transpose();
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < I; ++i) w[(o * I + i) * K + t] = static_cast<float>(tap(o, i));
  }
  return w;
}

TEST(LowRank, Tucker2RecoversAKernelOfThatRank) {
  const int64_t O = 16, I = 12, ro = 5, ri = 4;
  std::vector<float> w = tucker_kernel(O, I, 9, ro, ri);
  MatF uo(O, ro), ui(I, ri);
  std::vector<float> core(ro * ri * 9);
  const double err = tucker2(view4(w.data(), O, I, 3, 3), 2, view2(uo.data(), DType::kFloat32, O, ro),
                             view2(ui.data(), DType::kFloat32, I, ri), view4(core.data(), ro, ri, 3, 3));
  EXPECT_LT(err, 1e-5);
  EXPECT_LT((uo.transpose() * uo - MatF::Identity(ro, ro)).norm(), 1e-4);
  std::vector<float> so(O), si(I);
  tucker2_spectra(view4(w.data(), O, I, 3, 3), view1(so.data(), DType::kFloat32, O),
                  view1(si.data(), DType::kFloat32, I));
  EXPECT_GT(so[ro - 1], 1e-2);
  EXPECT_LT(so[ro], 1e-3 * so[0]);
  EXPECT_LT(si[ri], 1e-3 * si[0]);
}

TEST(LowRank, CpAlsRecoversAKernelOfThatRank) {
  const int64_t O = 8, I = 6, kh = 3, kw = 3, R = 3;
  std::mt19937 gen(6);
  std::normal_distribution<double> normal;
  MatD f[4] = {MatD(O, R), MatD(I, R), MatD(kh, R), MatD(kw, R)};
  for (auto& m : f)
    for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  std::vector<float> w(O * I * kh * kw);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i)
      for (int64_t y = 0; y < kh; ++y)
        for (int64_t x = 0; x < kw; ++x)
          w[((o * I + i) * kh + y) * kw + x] = static_cast<float>(
              (f[0].row(o).array() * f[1].row(i).array() * f[2].row(y).array() * f[3].row(x).array()).sum());
  MatF a(O, R), b(I, R), c(kh, R), d(kw, R);
  const double err = cp_als(view4(w.data(), O, I, kh, kw), 200, 1, view2(a.data(), DType::kFloat32, O, R),
                            view2(b.data(), DType::kFloat32, I, R), view2(c.data(), DType::kFloat32, kh, R),
                            view2(d.data(), DType::kFloat32, kw, R));
  EXPECT_LT(err, 1e-3);
}

TEST(LowRank, BadArgumentsAreValueErrors) {
  MatF w = decaying(10, 8, 1.0, 7);
  MatF u(10, 9), vt(9, 8);
  Eigen::VectorXf s(9);
  EXPECT_THROW(svd_randomized(view2(w.data(), DType::kFloat32, 10, 8), 5, 1, 0,
                              view2(u.data(), DType::kFloat32, 10, 9), view1(s.data(), DType::kFloat32, 9),
                              view2(vt.data(), DType::kFloat32, 9, 8)),
               ValueError);
  w(3, 2) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(run_exact(w, false), ValueError);
  std::vector<float> k = tucker_kernel(4, 4, 1, 2, 2);
  MatF uo(4, 5), ui(4, 2);
  std::vector<float> core(5 * 2);
  EXPECT_THROW(tucker2(view4(k.data(), 4, 4, 1, 1), 0, view2(uo.data(), DType::kFloat32, 4, 5),
                       view2(ui.data(), DType::kFloat32, 4, 2), view4(core.data(), 5, 2, 1, 1)),
               ValueError);
}

}  // namespace
}  // namespace tensorslim
