// SparseGPT core: with nothing to compensate (H = c I) it is magnitude pruning to the asked
// pattern with the kept weights untouched; with correlated inputs it beats magnitude pruning
// on the layer's output error; the n:m pattern and the unstructured count hold exactly; bad
// arguments are ValueErrors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "tensorslim/sparsegpt.h"
#include "tensorslim/status.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::view1;
using testing::view2;

struct Pruned {
  std::vector<float> w, scales;
  std::vector<uint8_t> keep;
  SparseGptResult result;
};

Pruned run(std::vector<float>& w, std::vector<float>& h, int64_t rows, int64_t cols, const SparseGptOptions& opt) {
  Pruned p;
  p.w.assign(rows * cols, 0.0f);
  p.keep.assign(rows * cols, 0);
  p.scales.assign(rows, 0.0f);
  p.result = sparsegpt_prune(view2(w.data(), DType::kFloat32, rows, cols),
                             view2(h.data(), DType::kFloat32, cols, cols), opt,
                             view2(p.w.data(), DType::kFloat32, rows, cols),
                             view2(p.keep.data(), DType::kUInt8, rows, cols),
                             view1(p.scales.data(), DType::kFloat32, rows));
  return p;
}

std::vector<float> scaled_identity(int64_t n, float c) {
  std::vector<float> h(n * n, 0.0f);
  for (int64_t i = 0; i < n; ++i) h[i * n + i] = c;
  return h;
}

TEST(SparseGpt, IdentityHessianIsMagnitudeNM) {
  const int64_t rows = 7, cols = 24;
  auto w = random_weights(rows * cols, 3);
  auto h = scaled_identity(cols, 2.0f);
  SparseGptOptions opt;
  opt.n = 2;
  opt.m = 4;
  const Pruned p = run(w, h, rows, cols, opt);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < cols / 4; ++g) {
      std::vector<float> mags;
      for (int j = 0; j < 4; ++j) mags.push_back(std::fabs(w[r * cols + g * 4 + j]));
      std::vector<float> sorted = mags;
      std::sort(sorted.begin(), sorted.end());
      for (int j = 0; j < 4; ++j) {
        const int64_t i = r * cols + g * 4 + j;
        const bool top2 = mags[j] >= sorted[2];
        EXPECT_EQ(p.keep[i], top2 ? 1 : 0) << r << "," << g * 4 + j;
        EXPECT_EQ(p.w[i], top2 ? w[i] : 0.0f);
      }
    }
}

TEST(SparseGpt, UnstructuredCountAndPartialBlock) {
  const int64_t rows = 5, cols = 21;  // blocks of 8: 8, 8, 5
  auto w = random_weights(rows * cols, 4);
  auto h = scaled_identity(cols, 1.0f);
  SparseGptOptions opt;
  opt.sparsity = 0.6;
  opt.block_size = 8;
  const Pruned p = run(w, h, rows, cols, opt);
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {
    const int64_t nb = std::min<int64_t>(8, cols - c0);
    int64_t pruned = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = c0; c < c0 + nb; ++c) pruned += p.keep[r * cols + c] == 0;
    EXPECT_EQ(pruned, static_cast<int64_t>(std::nearbyint(0.6 * rows * nb)));
  }
}

TEST(SparseGpt, BeatsMagnitudeOnCorrelatedInputs) {
  const int64_t rows = 32, cols = 64, tokens = 256;
  auto w = random_weights(rows * cols, 5);
  std::mt19937 gen(6);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(tokens * cols);
  for (int64_t t = 0; t < tokens; ++t) {
    const float shared = nd(gen);
    for (int64_t c = 0; c < cols; ++c) x[t * cols + c] = shared + 0.5f * nd(gen);  // correlated features
  }
  std::vector<float> h(cols * cols, 0.0f);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j < cols; ++j) h[i * cols + j] += 2.0f / tokens * x[t * cols + i] * x[t * cols + j];
  SparseGptOptions opt;
  opt.n = 2;
  opt.m = 4;
  const Pruned p = run(w, h, rows, cols, opt);
  auto magnitude = scaled_identity(cols, 1.0f);
  const Pruned mag = run(w, magnitude, rows, cols, opt);
  auto out_error = [&](const std::vector<float>& q) {
    double e = 0.0;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        double d = 0.0;
        for (int64_t c = 0; c < cols; ++c) d += (double(w[r * cols + c]) - q[r * cols + c]) * x[t * cols + c];
        e += d * d;
      }
    return e;
  };
  EXPECT_LT(out_error(p.w), 0.5 * out_error(mag.w));
}

TEST(SparseGpt, JointInt8ValuesSitOnTheGrid) {
  const int64_t rows = 6, cols = 16;
  auto w = random_weights(rows * cols, 7);
  auto h = scaled_identity(cols, 1.0f);
  SparseGptOptions opt;
  opt.n = 2;
  opt.m = 4;
  opt.bits = 8;
  const Pruned p = run(w, h, rows, cols, opt);
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0.0f;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
    EXPECT_FLOAT_EQ(p.scales[r], amax / 127.0f);
    for (int64_t c = 0; c < cols; ++c) {
      const double code = p.w[r * cols + c] / p.scales[r];
      EXPECT_NEAR(code, std::nearbyint(code), 1e-3);
      EXPECT_LE(std::fabs(code), 127.0 + 1e-3);
    }
  }
}

TEST(SparseGpt, BadArguments) {
  const int64_t rows = 4, cols = 8;
  auto w = random_weights(rows * cols, 8);
  auto h = scaled_identity(cols, 1.0f);
  SparseGptOptions nm;
  nm.n = 4;
  nm.m = 4;
  EXPECT_THROW(run(w, h, rows, cols, nm), ValueError);
  SparseGptOptions dense;
  dense.sparsity = 1.0;
  EXPECT_THROW(run(w, h, rows, cols, dense), ValueError);
  SparseGptOptions bits;
  bits.bits = 9;
  EXPECT_THROW(run(w, h, rows, cols, bits), ValueError);
  w[3] = NAN;
  EXPECT_THROW(run(w, h, rows, cols, SparseGptOptions{}), ValueError);
}

}  // namespace
}  // namespace tensorslim
