// The hidden-state and attention losses: every ISA's fp32 kernels against the scalar fp32
// reference on odd sizes, and the fp32 / bf16 paths against the float64 path (the scalar
// reference in double) through the public entry points; bad input names the tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "distill/feature_kernels.h"
#include "half.h"
#include "tensorslim/distill_features.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::IsaScope;
using testing::machine_isas;
using testing::view1;
using testing::view2;

// Probabilities: a softmax of random scores (with some exact zeros, as masks give).
std::vector<float> probs(int64_t n, uint32_t seed) {
  std::vector<float> x = testing::random_weights(n, seed);
  float m = -1e30f;
  for (float v : x) m = std::max(m, v);
  double z = 0;
  for (float& v : x) z += (v = std::exp(v - m));
  for (int64_t i = 0; i < n; ++i) x[i] = i % 11 == 3 ? 0.0f : static_cast<float>(x[i] / z);
  return x;
}

// |got - want| <= tol * scale, scale the largest |want| (a gradient) or |want| itself (a sum).
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double tol, const std::string& what) {
  double scale = 1e-30, err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
    err = std::max(err, std::fabs(static_cast<double>(got[i]) - want[i]));
  }
  EXPECT_LE(err, tol * scale) << what;
}

// The vector lanes sum in fp32 over at most a 2048-value chunk, the reference in double:
// 2e-6 relative (about 16 fp32 ulps) covers that and the polynomial exp / log.
constexpr double kSumTol = 2e-6;
constexpr double kGradTol = 2e-6;

TEST(DistillFeatureKernels, EveryIsaMatchesScalarOnOddSizes) {
  const auto& ref = cpu::scalar_feature_kernels<float>();
  for (int64_t n : {1, 7, 15, 16, 17, 33, 257, 1001, 2048}) {
    const std::vector<float> s = testing::random_weights(n, 3 + n), t = testing::random_weights(n, 5 + n);
    const std::vector<float> ps = probs(n, 7 + n), pt = probs(n, 9 + n);
    for (cpu::Isa isa : machine_isas()) {
      const auto& K = cpu::feature_kernels_for(isa);
      const std::string tag = std::string(cpu::isa_name(isa)) + " n=" + std::to_string(n);
      EXPECT_NEAR(K.sq_diff(s.data(), t.data(), n), ref.sq_diff(s.data(), t.data(), n),
                  kSumTol * ref.sq_diff(s.data(), t.data(), n)) << tag;
      double d[3] = {0, 0, 0}, dr[3] = {0, 0, 0};
      K.dots(s.data(), t.data(), n, d);
      ref.dots(s.data(), t.data(), n, dr);
      for (int k = 0; k < 3; ++k) EXPECT_NEAR(d[k], dr[k], kSumTol * (std::fabs(dr[0]) + std::fabs(dr[1]))) << tag;
      std::vector<float> g(n), gr(n);
      K.axpby(s.data(), t.data(), n, 0.75f, -1.25f, g.data());
      ref.axpby(s.data(), t.data(), n, 0.75f, -1.25f, gr.data());
      expect_close(g, gr, 1e-7, tag + " axpby");
      bool bad = false;
      EXPECT_EQ(K.max_checked(s.data(), n, &bad), ref.max_checked(s.data(), n, &bad)) << tag;
      EXPECT_FALSE(bad);
      // Attention rows: each (student, teacher) x (scores, probabilities) combination.
      for (int mode = 0; mode < 4; ++mode) {
        const bool sl = mode & 1, tl = mode & 2;
        const std::vector<float>& sv = sl ? s : ps;
        const std::vector<float>& tv = tl ? t : pt;
        bool b = false;
        const float ms = ref.max_checked(sv.data(), n, &b), mt = ref.max_checked(tv.data(), n, &b);
        cpu::AttnRow<float> p{sl, tl, ms, static_cast<float>(std::log(ref.sum_exp(sv.data(), n, ms))), mt,
                              static_cast<float>(std::log(ref.sum_exp(tv.data(), n, mt))), 0.3f, 0.0f};
        const std::string mtag = tag + " mode=" + std::to_string(mode);
        EXPECT_NEAR(K.sum_exp(sv.data(), n, ms), ref.sum_exp(sv.data(), n, ms), kSumTol * n) << mtag;
        double o[2] = {0, 0}, orf[2] = {0, 0};
        K.attn_kl_sums(sv.data(), tv.data(), n, p, o);
        ref.attn_kl_sums(sv.data(), tv.data(), n, p, orf);
        // KL terms are p_t * log-ratios of size up to ~30 (the 1e-12 floor): scale by that.
        EXPECT_NEAR(o[0], orf[0], kSumTol * (std::fabs(orf[0]) + 30 * orf[1])) << mtag << " kl";
        EXPECT_NEAR(o[1], orf[1], kSumTol * orf[1]) << mtag << " kl z";
        p.c = static_cast<float>(orf[1]);
        K.attn_kl_grad(sv.data(), tv.data(), n, p, g.data());
        ref.attn_kl_grad(sv.data(), tv.data(), n, p, gr.data());
        expect_close(g, gr, kGradTol, mtag + " kl grad");
        o[0] = o[1] = orf[0] = orf[1] = 0;
        K.attn_mse_sums(sv.data(), tv.data(), n, p, o);
        ref.attn_mse_sums(sv.data(), tv.data(), n, p, orf);
        EXPECT_NEAR(o[0], orf[0], kSumTol * orf[0] + 1e-12) << mtag << " mse";
        EXPECT_NEAR(o[1], orf[1], kSumTol * (orf[0] + std::fabs(orf[1])) + 1e-12) << mtag << " mse c";
        p.c = static_cast<float>(orf[1]);
        K.attn_mse_grad(sv.data(), tv.data(), n, p, g.data());
        ref.attn_mse_grad(sv.data(), tv.data(), n, p, gr.data());
        expect_close(g, gr, kGradTol, mtag + " mse grad");
      }
    }
  }
}

std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }

// One loss through the public entry points at fp32 (every ISA) against the float64 path.
template <class Fwd, class Bwd>
void check_against_f64(int64_t R, int64_t D, const std::vector<float>& s, const std::vector<float>& t, int stats_n,
                       Fwd fwd, Bwd bwd, const std::string& what) {
  const std::vector<double> sd = to_double(s), td = to_double(t);
  std::vector<double> loss_d(R), st_d(R * stats_n), scale(R), grad_d(R * D);
  for (int64_t r = 0; r < R; ++r) scale[r] = 0.5 + 0.25 * r;
  const TensorView sdv = view2(const_cast<double*>(sd.data()), DType::kFloat64, R, D),
                   tdv = view2(const_cast<double*>(td.data()), DType::kFloat64, R, D);
  fwd(sdv, tdv, view1(loss_d.data(), DType::kFloat64, R), view2(st_d.data(), DType::kFloat64, R, stats_n));
  bwd(sdv, tdv, view2(st_d.data(), DType::kFloat64, R, stats_n), view1(scale.data(), DType::kFloat64, R),
      view2(grad_d.data(), DType::kFloat64, R, D));
  std::vector<float> want_loss(loss_d.begin(), loss_d.end()), want_grad(grad_d.begin(), grad_d.end());
  for (cpu::Isa isa : machine_isas()) {
    IsaScope scope(isa);
    std::vector<double> loss(R), st(R * stats_n);
    std::vector<float> grad(R * D);
    const TensorView sv = view2(const_cast<float*>(s.data()), DType::kFloat32, R, D),
                     tv = view2(const_cast<float*>(t.data()), DType::kFloat32, R, D);
    fwd(sv, tv, view1(loss.data(), DType::kFloat64, R), view2(st.data(), DType::kFloat64, R, stats_n));
    bwd(sv, tv, view2(st.data(), DType::kFloat64, R, stats_n), view1(scale.data(), DType::kFloat64, R),
        view2(grad.data(), DType::kFloat32, R, D));
    const std::string tag = what + " " + cpu::isa_name(isa);
    // As the KD loss's tolerance: fp32 log-probabilities of size ~30 (scores with outliers)
    // carry ~2e-6 relative error into each probability; 2e-5 of the largest entry.
    expect_close(std::vector<float>(loss.begin(), loss.end()), want_loss, 2e-5, tag + " loss");
    expect_close(grad, want_grad, 2e-5, tag + " grad");
  }
}

TEST(DistillFeatureLoss, Fp32MatchesFloat64OnEveryIsa) {
  const int64_t R = 5, D = 2053;  // two chunks, a ragged tail
  const std::vector<float> s = testing::random_weights(R * D, 11), t = testing::random_weights(R * D, 12);
  for (HiddenKind kind : {HiddenKind::kMse, HiddenKind::kCosine}) {
    check_against_f64(
        R, D, s, t, kHiddenStats,
        [&](auto& a, auto& b, auto l, auto st) { hidden_loss_forward(a, b, kind, 1e-8, l, st); },
        [&](auto& a, auto& b, auto st, auto w, auto g) { hidden_loss_backward(a, b, kind, 1e-8, st, w, g); },
        "hidden " + std::to_string(static_cast<int>(kind)));
  }
  const std::vector<float> ps = probs(R * D, 13), pt = probs(R * D, 14);
  for (AttentionKind kind : {AttentionKind::kKl, AttentionKind::kMse}) {
    for (int mode = 0; mode < 4; ++mode) {
      const bool sl = mode & 1, tl = mode & 2;
      check_against_f64(
          R, D, sl ? s : ps, tl ? t : pt, kAttentionStats,
          [&](auto& a, auto& b, auto l, auto st) { attention_loss_forward(a, b, kind, sl, tl, l, st); },
          [&](auto& a, auto& b, auto st, auto w, auto g) { attention_loss_backward(a, b, kind, sl, tl, st, w, g); },
          "attention " + std::to_string(static_cast<int>(kind)) + " mode " + std::to_string(mode));
    }
  }
}

TEST(DistillFeatureLoss, Bf16RowsAreTheirFp32Values) {
  const int64_t R = 3, D = 77;
  std::vector<float> s = testing::random_weights(R * D, 21), t = testing::random_weights(R * D, 22);
  std::vector<uint16_t> sb(R * D), tb(R * D);
  for (int64_t i = 0; i < R * D; ++i) {
    sb[i] = cpu::float_to_bf16(s[i]);
    tb[i] = cpu::float_to_bf16(t[i]);
    s[i] = cpu::bf16_to_float(sb[i]);
    t[i] = cpu::bf16_to_float(tb[i]);
  }
  std::vector<double> l32(R), l16(R), st(R * kAttentionStats), w(R, 1.0);
  std::vector<float> g32(R * D);
  std::vector<uint16_t> g16(R * D);
  attention_loss_forward(view2(s.data(), DType::kFloat32, R, D), view2(t.data(), DType::kFloat32, R, D),
                         AttentionKind::kKl, true, true, view1(l32.data(), DType::kFloat64, R),
                         view2(st.data(), DType::kFloat64, R, kAttentionStats));
  attention_loss_backward(view2(s.data(), DType::kFloat32, R, D), view2(t.data(), DType::kFloat32, R, D),
                          AttentionKind::kKl, true, true, view2(st.data(), DType::kFloat64, R, kAttentionStats),
                          view1(w.data(), DType::kFloat64, R), view2(g32.data(), DType::kFloat32, R, D));
  attention_loss_forward(view2(sb.data(), DType::kBFloat16, R, D), view2(tb.data(), DType::kBFloat16, R, D),
                         AttentionKind::kKl, true, true, view1(l16.data(), DType::kFloat64, R),
                         view2(st.data(), DType::kFloat64, R, kAttentionStats));
  attention_loss_backward(view2(sb.data(), DType::kBFloat16, R, D), view2(tb.data(), DType::kBFloat16, R, D),
                          AttentionKind::kKl, true, true, view2(st.data(), DType::kFloat64, R, kAttentionStats),
                          view1(w.data(), DType::kFloat64, R), view2(g16.data(), DType::kBFloat16, R, D));
  for (int64_t r = 0; r < R; ++r) EXPECT_EQ(l32[r], l16[r]);  // same fp32 values, same kernels
  for (int64_t i = 0; i < R * D; ++i) EXPECT_EQ(g16[i], cpu::float_to_bf16(g32[i])) << i;
}

TEST(DistillFeatureLoss, BadInputNamesTheTensor) {
  const int64_t R = 2, D = 40;
  std::vector<float> s(R * D, 0.5f), t(R * D, 0.25f);
  std::vector<double> loss(R), st(R * kHiddenStats), sd(R * D, 0.5);
  auto hidden = [&](const TensorView& sv, const TensorView& tv) {
    hidden_loss_forward(sv, tv, HiddenKind::kMse, 1e-8, view1(loss.data(), DType::kFloat64, R),
                        view2(st.data(), DType::kFloat64, R, kHiddenStats));
  };
  auto expect_msg = [](auto fn, const std::string& want) {
    try {
      fn();
      FAIL() << "accepted: " << want;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  t[D + 3] = std::numeric_limits<float>::quiet_NaN();
  expect_msg([&] { hidden(view2(s.data(), DType::kFloat32, R, D), view2(t.data(), DType::kFloat32, R, D)); },
             "hidden_loss: teacher_hidden contains NaN or Inf (row 1)");
  t[D + 3] = 0;
  s[5] = std::numeric_limits<float>::infinity();
  std::vector<double> ast(R * kAttentionStats);
  expect_msg([&] {
    attention_loss_forward(view2(s.data(), DType::kFloat32, R, D), view2(t.data(), DType::kFloat32, R, D),
                           AttentionKind::kKl, true, true, view1(loss.data(), DType::kFloat64, R),
                           view2(ast.data(), DType::kFloat64, R, kAttentionStats));
  }, "attention_loss: student_attn contains NaN or Inf (row 0)");
  s[5] = 0.5f;
  expect_msg([&] { hidden(view2(s.data(), DType::kFloat32, R, D), view2(t.data(), DType::kFloat32, R, D - 1)); },
             "teacher_hidden: expected shape [2, 40] like student_hidden, got [2, 39]");
  expect_msg([&] { hidden(view2(sd.data(), DType::kFloat64, R, D), view2(t.data(), DType::kFloat32, R, D)); },
             "float64 needs both tensors in float64");
  expect_msg([&] { hidden(view2(s.data(), DType::kInt32, R, D), view2(t.data(), DType::kFloat32, R, D)); },
             "student_hidden: expected float32, bfloat16, float16 or float64, got int32");
}

}  // namespace
}  // namespace tensorslim
