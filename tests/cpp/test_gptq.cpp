// GPTQ and AWQ cores: GPTQ with nothing to compensate (diagonal H) is exactly the
// round-to-nearest spec of gptq.h; with correlated inputs it beats round to nearest on the
// layer's output error; damping escalates when H is singular; bad arguments are ValueErrors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "awq_kernels.h"
#include "tensorslim/awq.h"
#include "tensorslim/gptq.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::view1;
using testing::view2;

struct Out {
  std::vector<int32_t> codes;
  std::vector<float> scales;
  std::vector<uint8_t> zps;
  GptqResult result;
};

Out run_gptq(std::vector<float>& w, std::vector<float>& h, int64_t rows, int64_t cols,
             const GptqOptions& opt) {
  const int64_t groups = cols / opt.group_size;
  Out o;
  o.codes.assign(rows * cols, 0);
  o.scales.assign(rows * groups, 0.0f);
  o.zps.assign(rows * groups, 0);
  o.result = gptq_quantize(view2(w.data(), DType::kFloat32, rows, cols),
                           view2(h.data(), DType::kFloat32, cols, cols), opt,
                           view2(o.codes.data(), DType::kInt32, rows, cols),
                           view2(o.scales.data(), DType::kFloat32, rows, groups),
                           view2(o.zps.data(), DType::kUInt8, rows, groups));
  return o;
}

// Round to nearest as gptq.h specifies it, in double with fp32 scales.
void rtn(const std::vector<float>& w, int64_t rows, int64_t cols, int64_t g, int bits, bool sym,
         std::vector<int32_t>* codes, std::vector<double>* deq) {
  const IntGrid grid = int_grid(bits, sym);
  codes->assign(rows * cols, 0);
  deq->assign(rows * cols, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c0 = 0; c0 < cols; c0 += g) {
      double lo = 0, hi = 0;
      for (int64_t c = c0; c < c0 + g; ++c) {
        lo = std::min(lo, double(w[r * cols + c]));
        hi = std::max(hi, double(w[r * cols + c]));
      }
      float scale = static_cast<float>((sym ? std::max(-lo, hi) : hi - lo) / grid.divisor);
      if (!(scale > 0)) scale = 1;
      const double zp = sym ? 0 : std::min<double>(std::max<double>(std::nearbyint(-lo / scale), grid.qmin), grid.qmax);
      for (int64_t c = c0; c < c0 + g; ++c) {
        double q = std::nearbyint(w[r * cols + c] / double(scale)) + zp;
        q = std::min<double>(std::max<double>(q, grid.qmin), grid.qmax);
        (*codes)[r * cols + c] = static_cast<int32_t>(q);
        (*deq)[r * cols + c] = (q - zp) * scale;
      }
    }
}

TEST(GptqCore, DiagonalHessianIsRoundToNearest) {
  const int64_t rows = 37, cols = 256;
  std::vector<float> w = random_weights(rows * cols, 1);
  std::vector<float> h(cols * cols, 0.0f);
  std::mt19937 gen(2);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = u(gen);
  for (bool sym : {true, false})
    for (int bits : {2, 3, 4, 8})
      for (bool act_order : {false, true}) {
        GptqOptions opt;
        opt.bits = bits;
        opt.symmetric = sym;
        opt.group_size = 64;
        opt.act_order = act_order;
        Out o = run_gptq(w, h, rows, cols, opt);
        std::vector<int32_t> codes;
        std::vector<double> deq;
        rtn(w, rows, cols, 64, bits, sym, &codes, &deq);
        EXPECT_EQ(o.codes, codes) << "bits " << bits << " sym " << sym << " act_order " << act_order;
        EXPECT_EQ(o.result.damp_used, 0.01);
      }
}

TEST(GptqCore, BeatsRoundToNearestOnCorrelatedInputs) {
  const int64_t rows = 64, cols = 256, n = 1024;
  std::vector<float> w = random_weights(rows * cols, 3);
  // Correlated inputs: a shared latent factor plus noise, a few loud channels.
  std::mt19937 gen(4);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> x(n * cols);
  for (int64_t t = 0; t < n; ++t) {
    const double z = normal(gen);
    for (int64_t c = 0; c < cols; ++c) x[t * cols + c] = (0.8 * z + 0.6 * normal(gen)) * (c % 31 == 0 ? 8 : 1);
  }
  std::vector<float> h(cols * cols);
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double s = 0;
      for (int64_t t = 0; t < n; ++t) s += x[t * cols + i] * x[t * cols + j];
      h[i * cols + j] = static_cast<float>(2.0 * s / n);
    }
  auto output_error = [&](const std::vector<double>& deq) {
    double e = 0;
    for (int64_t t = 0; t < n; t += 4)
      for (int64_t r = 0; r < rows; ++r) {
        double y = 0;
        for (int64_t c = 0; c < cols; ++c) y += x[t * cols + c] * (w[r * cols + c] - deq[r * cols + c]);
        e += y * y;
      }
    return e;
  };
  for (int bits : {4, 3}) {
    GptqOptions opt;
    opt.bits = bits;
    opt.group_size = 128;
    Out o = run_gptq(w, h, rows, cols, opt);
    std::vector<double> deq(rows * cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        deq[r * cols + c] = (o.codes[r * cols + c] - o.zps[r * 2 + c / 128]) * double(o.scales[r * 2 + c / 128]);
    std::vector<int32_t> codes;
    std::vector<double> rtn_deq;
    rtn(w, rows, cols, 128, bits, true, &codes, &rtn_deq);
    const double e_gptq = output_error(deq), e_rtn = output_error(rtn_deq);
    EXPECT_LT(e_gptq, 0.7 * e_rtn) << "bits " << bits;
  }
}

TEST(GptqCore, DampingRisesWhenHIsSingular) {
  const int64_t rows = 4, cols = 64;
  std::vector<float> w = random_weights(rows * cols, 5);
  std::vector<float> h(cols * cols, 1.0f);  // rank one: not invertible without damping
  GptqOptions opt;
  opt.group_size = 64;
  opt.damp = 0.0;
  Out o = run_gptq(w, h, rows, cols, opt);
  EXPECT_GT(o.result.damp_used, 0.0);
  for (int32_t c : o.codes) EXPECT_TRUE(c >= -8 && c <= 7);
}

TEST(GptqCore, BadArgumentsAreValueErrors) {
  const int64_t rows = 4, cols = 64;
  std::vector<float> w = random_weights(rows * cols, 6);
  std::vector<float> h(cols * cols, 0.0f);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = -1.0f;  // negative definite: hopeless
  GptqOptions opt;
  opt.group_size = 64;
  EXPECT_THROW(run_gptq(w, h, rows, cols, opt), ValueError);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0f;
  opt.group_size = 48;  // does not divide 64
  EXPECT_THROW(run_gptq(w, h, rows, cols, opt), ValueError);
  opt.group_size = 64;
  opt.bits = 9;
  EXPECT_THROW(run_gptq(w, h, rows, cols, opt), ValueError);
  opt.bits = 4;
  w[3] = std::nanf("");
  EXPECT_THROW(run_gptq(w, h, rows, cols, opt), ValueError);
}

TEST(AwqCore, ScaleSearchAlphaZeroIsRoundToNearestError) {
  // alpha = 0 means s = 1: the loss must be the plain round-to-nearest output error.
  const int64_t rows = 8, cols = 128;
  std::vector<float> w = random_weights(rows * cols, 7);
  std::vector<float> g(cols * cols, 0.0f), act(cols, 1.0f);
  for (int64_t i = 0; i < cols; ++i) g[i * cols + i] = 1.0f;  // identity Gram: loss = |d|^2
  for (int64_t i = 0; i < cols; ++i) act[i] = 0.1f + 0.05f * (i % 9);
  std::vector<float> losses(20);
  AwqQuant q{4, true, 64};
  const int64_t best = awq_search_scale(view2(w.data(), DType::kFloat32, rows, cols),
                                        view2(g.data(), DType::kFloat32, cols, cols),
                                        view1(act.data(), DType::kFloat32, cols), q, 20,
                                        view1(losses.data(), DType::kFloat32, 20));
  std::vector<int32_t> codes;
  std::vector<double> deq;
  rtn(w, rows, cols, 64, 4, true, &codes, &deq);
  double e = 0;
  for (int64_t i = 0; i < rows * cols; ++i) e += (w[i] - deq[i]) * (w[i] - deq[i]);
  EXPECT_NEAR(losses[0], e / rows, 1e-4 * e / rows);
  EXPECT_GE(best, 0);
  EXPECT_LT(best, 20);
  for (float l : losses) EXPECT_GE(l, losses[best]);
}

TEST(AwqCore, Avx2FakeQuantIsBitExact) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  std::vector<float> v = random_weights(4096, 8), out(4096);
  for (bool sym : {true, false})
    for (int bits : {2, 3, 4, 8})
      for (int64_t n : {32, 37, 128, 5})
        for (float ratio : {1.0f, 0.85f, 0.55f}) {
          const IntGrid g = int_grid(bits, sym);
          cpu::fake_quant_avx2(v.data(), out.data(), n, g.qmin, g.qmax, g.divisor, sym, ratio);
          // the spec (quantize.h rules on the shrunk range), written out
          float lo = 0, hi = 0;
          for (int64_t i = 0; i < n; ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
          lo *= ratio;
          hi *= ratio;
          float scale = (sym ? std::max(-lo, hi) : hi - lo) / float(g.divisor);
          if (!(scale > 0)) scale = 1;
          const float zp = sym ? 0.0f : std::min(std::max(std::nearbyint(-lo / scale), float(g.qmin)), float(g.qmax));
          for (int64_t i = 0; i < n; ++i) {
            const float c = std::min(std::max(std::nearbyint(v[i] / scale) + zp, float(g.qmin)), float(g.qmax));
            ASSERT_EQ(out[i], (c - zp) * scale) << "bits " << bits << " n " << n << " i " << i;
          }
        }
}

// Both vector kernels (AVX2, and AVX-512 where the machine has it), full and folded-upper G.
TEST(AwqCore, VectorQuadraticFormsMatchDouble) {
  using Kernel = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, double*, bool);
  std::vector<std::pair<cpu::Isa, Kernel>> kernels;
  if (cpu::best_isa() >= cpu::Isa::kAVX2) kernels.push_back({cpu::Isa::kAVX2, cpu::quad_forms_avx2});
  if (cpu::best_isa() >= cpu::Isa::kAVX512) kernels.push_back({cpu::Isa::kAVX512, cpu::quad_forms_avx512});
  if (kernels.empty()) GTEST_SKIP() << "no AVX2";
  for (auto [isa, kernel] : kernels)
    for (bool upper : {false, true})
      for (int64_t K : {16, 32, 128, 200, 37}) {  // 200, 37: a partial last strip
        const int64_t nr = 7, ldg = K + 3;
        std::vector<float> d = random_weights(nr * K, 9), a = random_weights(K * K, 10), g(K * ldg);
        for (int64_t i = 0; i < K; ++i)  // symmetric G = A + A^T
          for (int64_t j = 0; j < K; ++j) g[i * ldg + j] = a[i * K + j] + a[j * K + i];
        std::vector<float> folded = g;  // G_ii, 2 G_ij above, zeros below
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j)
            folded[i * ldg + j] = j > i ? 2.0f * g[i * ldg + j] : j == i ? g[i * ldg + j] : 0.0f;
        std::vector<double> out(nr);
        kernel(d.data(), nr, K, K, upper ? folded.data() : g.data(), ldg, out.data(), upper);
        for (int64_t r = 0; r < nr; ++r) {
          double ref = 0, mag = 0;
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < K; ++j) {
              const double t = double(d[r * K + i]) * g[i * ldg + j] * d[r * K + j];
              ref += t;
              mag += std::fabs(t);
            }
          EXPECT_NEAR(out[r], ref, 1e-5 * mag)
              << cpu::isa_name(isa) << " upper " << upper << " K " << K << " row " << r;
        }
      }
}

TEST(AwqCore, Avx512FakeQuantIsTheAvx2One) {
  if (cpu::best_isa() < cpu::Isa::kAVX512) GTEST_SKIP() << "no AVX-512";
  std::vector<float> v = random_weights(4096, 8), a(4096), b(4096);
  for (bool sym : {true, false})
    for (int bits : {2, 3, 4, 8})
      for (int64_t n : {32, 37, 128, 5, 64})
        for (float ratio : {1.0f, 0.85f, 0.55f}) {
          const IntGrid g = int_grid(bits, sym);
          cpu::fake_quant_avx2(v.data(), a.data(), n, g.qmin, g.qmax, g.divisor, sym, ratio);
          cpu::fake_quant_avx512(v.data(), b.data(), n, g.qmin, g.qmax, g.divisor, sym, ratio);
          for (int64_t i = 0; i < n; ++i) ASSERT_EQ(a[i], b[i]) << "bits " << bits << " n " << n;
        }
}

// The searches under every ISA the machine has against the scalar (Eigen) path: the vector
// kernels read G's folded upper triangle, so losses agree to rounding and the choices match.
TEST(AwqCore, SearchesAgreeOnEveryIsa) {
  const int64_t rows = 40, cols = 192, gs = 64, groups = cols / gs;
  std::vector<float> w = random_weights(rows * cols, 11), x = random_weights(256 * cols, 12);
  std::vector<float> g(cols * cols, 0.0f), act(cols, 0.0f);
  for (int64_t t = 0; t < 256; ++t)
    for (int64_t i = 0; i < cols; ++i) {
      act[i] += std::fabs(x[t * cols + i]) / 256.0f;
      for (int64_t j = 0; j < cols; ++j) g[i * cols + j] += x[t * cols + i] * x[t * cols + j] / 256.0f;
    }
  AwqQuant q{4, true, gs};
  auto run = [&](cpu::Isa isa, std::vector<float>* scale_losses, std::vector<float>* clip_losses,
                 std::vector<float>* ratios) {
    testing::IsaScope scope(isa);
    scale_losses->assign(20, 0.0f);
    awq_search_scale(view2(w.data(), DType::kFloat32, rows, cols), view2(g.data(), DType::kFloat32, cols, cols),
                     view1(act.data(), DType::kFloat32, cols), q, 20,
                     view1(scale_losses->data(), DType::kFloat32, 20));
    clip_losses->assign(rows * groups * 10, 0.0f);
    ratios->assign(rows * groups, 0.0f);
    TensorView lv = view2(clip_losses->data(), DType::kFloat32, rows, groups * 10);
    lv.ndim = 3;
    lv.shape[1] = groups;
    lv.shape[2] = 10;
    lv.strides[0] = groups * 10;
    lv.strides[1] = 10;
    lv.strides[2] = 1;
    awq_search_clip(view2(w.data(), DType::kFloat32, rows, cols), view2(g.data(), DType::kFloat32, cols, cols), q,
                    20, 0.5, view2(ratios->data(), DType::kFloat32, rows, groups), lv);
  };
  std::vector<float> ref_scale, ref_clip, ref_ratio;
  run(cpu::Isa::kScalar, &ref_scale, &ref_clip, &ref_ratio);
  for (cpu::Isa isa : testing::machine_isas()) {
    std::vector<float> sc, cl, ra;
    run(isa, &sc, &cl, &ra);
    for (int k = 0; k < 20; ++k) EXPECT_NEAR(sc[k], ref_scale[k], 1e-4 * ref_scale[k]) << cpu::isa_name(isa);
    for (size_t i = 0; i < cl.size(); ++i)
      EXPECT_NEAR(cl[i], ref_clip[i], 1e-4 * ref_clip[i] + 1e-6) << cpu::isa_name(isa) << " " << i;
    int64_t same = 0;
    for (size_t i = 0; i < ra.size(); ++i) same += ra[i] == ref_ratio[i];
    EXPECT_GE(same, static_cast<int64_t>(ra.size()) - 2) << cpu::isa_name(isa);  // near-ties only
  }
}

}  // namespace
}  // namespace tensorslim
