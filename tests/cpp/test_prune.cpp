// Pruning cores: every ISA's score and mask loops bit for bit against the scalar
// reference, selection against a full sort, exact prune counts with ties, histograms.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "tensorslim/prune.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::view1;

std::vector<cpu::Isa> isas() {
  std::vector<cpu::Isa> out{cpu::Isa::kScalar};
  if (static_cast<int>(cpu::best_isa()) >= 1) out.push_back(cpu::Isa::kAVX2);
  if (static_cast<int>(cpu::best_isa()) >= 2) out.push_back(cpu::Isa::kAVX512);
  return out;
}

struct IsaGuard {
  cpu::Isa saved = cpu::active_isa();
  ~IsaGuard() { cpu::set_isa(saved); }
};

TEST(Prune, ScoresAndMasksBitExactOnEveryIsa) {
  IsaGuard guard;
  for (int64_t n : {1, 7, 8, 15, 16, 17, 1000, 4099}) {
    std::vector<float> w = random_weights(n, 7 + n);
    for (int64_t i = 0; i < n; i += 5) w[i] = -w[(i + 3) % n];  // equal magnitudes: ties
    for (int p : {1, 2}) {
      std::vector<float> ref(n);
      cpu::scores_scalar(w.data(), n, p, ref.data());
      std::vector<float> sorted = ref;
      std::sort(sorted.begin(), sorted.end());
      const float t = sorted[n / 2];
      std::vector<uint8_t> ref_keep(n);
      const cpu::MaskCounts rc = cpu::mask_scalar(w.data(), n, p, t, ref_keep.data());
      for (cpu::Isa isa : isas()) {
        cpu::set_isa(isa);
        std::vector<float> s(n, -1.0f);
        prune_scores(view1(w.data(), DType::kFloat32, n), p, view1(s.data(), DType::kFloat32, n));
        EXPECT_EQ(0, std::memcmp(s.data(), ref.data(), n * 4)) << cpu::isa_name(isa) << " n=" << n;
        std::vector<uint8_t> keep(n, 9);
        cpu::MaskCounts c;
        if (isa == cpu::Isa::kAVX2) c = cpu::mask_avx2(w.data(), n, p, t, keep.data());
        else if (isa == cpu::Isa::kAVX512) c = cpu::mask_avx512(w.data(), n, p, t, keep.data());
        else c = cpu::mask_scalar(w.data(), n, p, t, keep.data());
        EXPECT_EQ(keep, ref_keep) << cpu::isa_name(isa) << " n=" << n;
        EXPECT_EQ(c.less, rc.less);
        EXPECT_EQ(c.equal, rc.equal);
      }
    }
  }
}

TEST(Prune, KthSmallestMatchesSort) {
  std::vector<float> w = random_weights(5003, 11);
  std::vector<float> s(w.size());
  cpu::scores_scalar(w.data(), w.size(), 1, s.data());
  std::vector<float> sorted = s;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{2501}, int64_t{5002}, int64_t{5003}}) {
    std::vector<float> buf = s;
    const int64_t n = buf.size();
    EXPECT_EQ(kth_smallest(view1(buf.data(), DType::kFloat32, n), k), sorted[k - 1]) << k;
  }
  std::vector<float> buf = s;
  EXPECT_THROW(kth_smallest(view1(buf.data(), DType::kFloat32, buf.size()), 0), ValueError);
}

TEST(Prune, MaskPrunesExactlyKWithTiesInIndexOrder) {
  IsaGuard guard;
  // 40 zeros (ties at the threshold) among 100 values: pruning 30 takes the first 30 zeros.
  std::vector<float> w(100);
  for (int i = 0; i < 100; ++i) w[i] = (i % 5 < 2) ? 0.0f : 1.0f + i;
  for (cpu::Isa isa : isas()) {
    cpu::set_isa(isa);
    std::vector<uint8_t> keep(100);
    const int64_t pruned = prune_mask(view1(w.data(), DType::kFloat32, 100), 1, 0.0f, 30,
                                      view1(keep.data(), DType::kUInt8, 100));
    EXPECT_EQ(pruned, 30);
    int zeros_pruned = 0;
    for (int i = 0; i < 100; ++i) {
      if (w[i] != 0.0f) EXPECT_EQ(keep[i], 1);
      else if (!keep[i]) EXPECT_EQ(zeros_pruned++, i / 5 * 2 + i % 5) << "ties in index order";
    }
    EXPECT_EQ(zeros_pruned, 30);
  }
}

TEST(Prune, HistogramCountsTheScoreBits) {
  std::vector<float> w = random_weights(3000, 5);
  std::vector<int32_t> hist(1 << 10, 0);
  score_histogram(view1(w.data(), DType::kFloat32, w.size()), 2, 21, 10, 0,
                  view1(hist.data(), DType::kInt32, hist.size()));
  std::vector<int32_t> want(1 << 10, 0);
  for (float x : w) {
    const float s = x * x;
    uint32_t b;
    std::memcpy(&b, &s, 4);
    ++want[(b >> 21) & 1023];
  }
  EXPECT_EQ(hist, want);
}

TEST(Prune, HistogramPassesBitExactOnEveryIsa) {
  IsaGuard guard;
  std::vector<float> w = random_weights(4099, 9);
  for (int64_t i = 0; i < 4099; i += 13) w[i] = 0.0f;
  for (int p : {1, 2}) {
    // the three passes of a real selection: prefixes from the median's bits
    float med = std::fabs(w[2049]);
    if (p == 2) med = w[2049] * w[2049];
    uint32_t mb;
    std::memcpy(&mb, &med, 4);
    const int passes[3][2] = {{21, 10}, {10, 11}, {0, 10}};
    for (const auto& ps : passes) {
      const int shift = ps[0], nbits = ps[1];
      const uint32_t prefix = shift + nbits >= 32 ? 0u : mb >> (shift + nbits);
      std::vector<int32_t> ref(1 << nbits, 0);
      cpu::hist_scalar(w.data(), 4099, cpu::HistPass{p, shift, nbits, prefix}, ref.data());
      for (cpu::Isa isa : isas()) {
        cpu::set_isa(isa);
        std::vector<int32_t> got(1 << nbits, 0);
        score_histogram(view1(w.data(), DType::kFloat32, 4099), p, shift, nbits, prefix,
                        view1(got.data(), DType::kInt32, got.size()));
        EXPECT_EQ(got, ref) << cpu::isa_name(isa) << " p=" << p << " shift=" << shift;
      }
    }
  }
}

}  // namespace
}  // namespace tensorslim
