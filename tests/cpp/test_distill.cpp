// The KD loss core against a double-precision reference written out here, on every ISA.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "distill/kd_kernels.h"
#include "tensorslim/distill.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::IsaScope;
using testing::machine_isas;
using testing::view1;
using testing::view2;

TEST(DistillKernels, SumExpMatchesDouble) {
  std::vector<float> x(1003);
  for (size_t i = 0; i < x.size(); ++i) x[i] = -100.0f + 110.0f * static_cast<float>(i) / x.size();
  double want = 0;
  for (float v : x) want += std::exp((static_cast<double>(v) - 10.0) * 0.5);
  for (cpu::Isa isa : machine_isas()) {
    const double got = cpu::kd_kernels_for(isa).sum_exp(x.data(), x.size(), 10.0f, 0.5f);
    EXPECT_NEAR(got, want, 1e-6 * want) << cpu::isa_name(isa);
  }
}

// Each ISA's KD kernels against the scalar fp32 reference on odd chunk sizes (tails after the
// 8- and 16-lane loops), every gradient variant. Lanes sum in fp32 within a chunk, the
// reference in double: 2e-6 relative (about 16 fp32 ulps) covers that and the polynomial exp.
TEST(DistillKernels, EveryIsaMatchesScalarOnOddSizes) {
  const cpu::KdKernels& ref = cpu::scalar_kd_kernels();
  for (int64_t n : {1, 7, 9, 15, 17, 31, 33, 1001, 2048}) {
    std::vector<float> s = testing::random_weights(n, 40 + n), t = testing::random_weights(n, 50 + n);
    bool bad = false;
    const float ms = ref.max_checked(s.data(), n, &bad), mt = ref.max_checked(t.data(), n, &bad);
    const float inv_t = 0.4f;
    double want[3] = {0, 0, 0};
    ref.kl_sums(t.data(), s.data(), n, mt, ms, inv_t, want);
    const float lzs = static_cast<float>(std::log(ref.sum_exp(s.data(), n, ms, inv_t)));
    const float lzt = static_cast<float>(std::log(want[0]));
    const float lz1 = static_cast<float>(std::log(ref.sum_exp(s.data(), n, ms, 1.0f)));
    for (cpu::Isa isa : machine_isas()) {
      const cpu::KdKernels& K = cpu::kd_kernels_for(isa);
      const std::string tag = std::string(cpu::isa_name(isa)) + " n=" + std::to_string(n);
      bool b = false;
      EXPECT_EQ(K.max_checked(s.data(), n, &b), ms) << tag;
      EXPECT_FALSE(b) << tag;
      double got[3] = {0, 0, 0};
      K.kl_sums(t.data(), s.data(), n, mt, ms, inv_t, got);
      for (int k = 0; k < 3; ++k) EXPECT_NEAR(got[k], want[k], 2e-6 * (std::fabs(want[0]) + std::fabs(want[1]))) << tag;
      for (int variant = 0; variant < 6; ++variant) {  // {forward, forward top_k, reverse} x {no CE, CE}
        cpu::KdGradParams p{ms, mt, inv_t, lzs, lzt, lz1, 0.7f, variant % 2 ? 0.3f : 0.0f, 0.05f,
                            variant / 2 == 2, variant / 2 != 1};
        std::vector<float> g(n), gr(n);
        K.grad(s.data(), t.data(), n, p, g.data());
        ref.grad(s.data(), t.data(), n, p, gr.data());
        double scale = 1e-30, err = 0;
        for (int64_t i = 0; i < n; ++i) {
          scale = std::fmax(scale, std::fabs(gr[i]));
          err = std::fmax(err, std::fabs(static_cast<double>(g[i]) - gr[i]));
        }
        EXPECT_LE(err, 2e-6 * scale) << tag << " variant " << variant;
      }
    }
  }
}

// Forward KL with hard labels (alpha mix) in double, and its gradient, for one row.
void reference_row(const float* s, const float* t, int64_t V, double T, double alpha, int y, double* loss,
                   std::vector<double>& grad) {
  auto lse = [&](const float* x, double scale) {
    double m = -std::numeric_limits<double>::infinity(), z = 0;
    for (int64_t i = 0; i < V; ++i) m = std::fmax(m, x[i] * scale);
    for (int64_t i = 0; i < V; ++i) z += std::exp(x[i] * scale - m);
    return m + std::log(z);
  };
  const double ls = lse(s, 1 / T), lt = lse(t, 1 / T), l1 = lse(s, 1);
  double kl = 0;
  grad.assign(V, 0);
  for (int64_t i = 0; i < V; ++i) {
    const double lps = s[i] / T - ls, lpt = t[i] / T - lt;
    kl += std::exp(lpt) * (lpt - lps);
    grad[i] = alpha * T * (std::exp(lps) - std::exp(lpt)) + (1 - alpha) * std::exp(s[i] - l1);
  }
  grad[y] -= 1 - alpha;
  *loss = alpha * T * T * kl + (1 - alpha) * (l1 - s[y]);
}

TEST(DistillKdLoss, MatchesDoubleReferenceOnEveryIsa) {
  const int64_t R = 3, V = 5003, ld = V + 5;  // strided rows, a tail after the 16-lane loop
  std::vector<float> s = testing::random_weights(R * ld, 1), t = testing::random_weights(R * ld, 2);
  std::vector<int32_t> labels = {7, 5002, 0};
  KdOptions opt;
  opt.temperature = 2.5;
  opt.alpha = 0.6;
  opt.has_labels = true;
  for (cpu::Isa isa : machine_isas()) {
    IsaScope scope(isa);
    std::vector<float> rows(R), stats(R * kKdStats), scale(R, 1.0f), grad(R * ld, 0.0f);
    const TensorView sv = view2(s.data(), DType::kFloat32, R, V, ld), tv = view2(t.data(), DType::kFloat32, R, V, ld);
    const TensorView yv = view1(labels.data(), DType::kInt32, R);
    kd_loss_forward(sv, tv, &yv, nullptr, opt, view1(rows.data(), DType::kFloat32, R),
                    view2(stats.data(), DType::kFloat32, R, kKdStats));
    kd_loss_backward(sv, tv, &yv, nullptr, view2(stats.data(), DType::kFloat32, R, kKdStats),
                     view1(scale.data(), DType::kFloat32, R), opt, view2(grad.data(), DType::kFloat32, R, V, ld));
    for (int64_t r = 0; r < R; ++r) {
      double want;
      std::vector<double> want_grad;
      reference_row(&s[r * ld], &t[r * ld], V, opt.temperature, opt.alpha, labels[r], &want, want_grad);
      EXPECT_NEAR(rows[r], want, 2e-5 * std::fabs(want)) << cpu::isa_name(isa) << " row " << r;
      double gmax = 0, err = 0;
      for (int64_t i = 0; i < V; ++i) {
        gmax = std::fmax(gmax, std::fabs(want_grad[i]));
        err = std::fmax(err, std::fabs(grad[r * ld + i] - want_grad[i]));
      }
      EXPECT_LE(err, 2e-5 * gmax) << cpu::isa_name(isa) << " row " << r;
    }
  }
}

TEST(DistillKdLoss, BadInputNamesTheTensor) {
  const int64_t R = 2, V = 100;
  std::vector<float> s(R * V, 0.5f), t(R * V, 0.25f), rows(R), stats(R * kKdStats);
  t[V + 42] = std::numeric_limits<float>::quiet_NaN();
  KdOptions opt;
  auto run = [&](int64_t tv_cols) {
    kd_loss_forward(view2(s.data(), DType::kFloat32, R, V), view2(t.data(), DType::kFloat32, R, tv_cols, V), nullptr,
                    nullptr, opt, view1(rows.data(), DType::kFloat32, R),
                    view2(stats.data(), DType::kFloat32, R, kKdStats));
  };
  try {
    run(V);
    FAIL() << "NaN accepted";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("teacher_logits contains NaN or Inf (row 1)"), std::string::npos) << e.what();
  }
  try {
    run(V - 1);
    FAIL() << "vocabulary mismatch accepted";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("vocabulary mismatch"), std::string::npos) << e.what();
  }
  t[V + 42] = 0;
  opt.temperature = 0;
  EXPECT_THROW(run(V), ValueError);
}

}  // namespace
}  // namespace tensorslim
