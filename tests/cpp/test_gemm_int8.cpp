// W8A8: AVX-512 activation quantizers bit-exact against the scalar references, the scalar
// INT8 GEMM against a float64 product of the decoded values, and oneDNN against the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>

#include "onednn_int8_exact.h"
#include "onednn_usable.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::avx2_vnni_settings;
using testing::Avx2VnniScope;
using testing::IsaScope;
using testing::random_weights;
using testing::view1;
using testing::view2;

std::vector<float> smooth_factors(int64_t K, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(0.05f, 4.0f);
  std::vector<float> v(K);
  for (auto& x : v) x = u(gen);
  return v;
}

bool have_avx512() { return cpu::best_isa() == cpu::Isa::kAVX512; }

using PerTokenFn = bool (*)(const TensorView&, const TensorView*, const TensorView&, const TensorView&);
using StaticFn = bool (*)(const TensorView&, const TensorView*, float, int32_t, const TensorView&);

// The vectorized quantizers this CPU can run, each to be checked against the reference.
std::vector<std::pair<PerTokenFn, StaticFn>> vector_quantizers() {
  std::vector<std::pair<PerTokenFn, StaticFn>> fns;
  if (have_avx512()) fns.emplace_back(cpu::quantize_per_token_avx512, cpu::quantize_static_avx512);
  if (cpu::best_isa() >= cpu::Isa::kAVX2)
    fns.emplace_back(cpu::quantize_per_token_avx2, cpu::quantize_static_avx2);
  return fns;
}

TEST(GemmInt8, PerTokenVectorPathsMatchReferenceBitForBit) {
  if (vector_quantizers().empty()) GTEST_SKIP() << "no AVX2";
  for (const auto& fns : vector_quantizers())
  for (int64_t K : {1, 7, 15, 16, 33, 384, 1000}) {
    const PerTokenFn per_token = fns.first;
    for (bool smooth : {false, true}) {
      const int64_t M = 7;
      std::vector<float> x = random_weights(M * K, 11 + K), inv = smooth_factors(K, 5);
      for (int64_t k = 0; k < K; ++k) x[3 * K + k] = 0.0f;  // an all-zero token: scale 1
      std::vector<int8_t> qa(M * K), qb(M * K);
      std::vector<float> sa(M), sb(M);
      TensorView xv = view2(x.data(), DType::kFloat32, M, K), iv = view1(inv.data(), DType::kFloat32, K);
      const TensorView* ip = smooth ? &iv : nullptr;
      cpu::quantize_per_token_reference(xv, ip, view2(qa.data(), DType::kInt8, M, K),
                                        view1(sa.data(), DType::kFloat32, M));
      ASSERT_TRUE(per_token(xv, ip, view2(qb.data(), DType::kInt8, M, K),
                            view1(sb.data(), DType::kFloat32, M)));
      EXPECT_EQ(qa, qb) << "K=" << K;
      EXPECT_EQ(sa, sb) << "K=" << K;
      // uint8 output: the same codes + 128, on both paths.
      std::vector<uint8_t> ua(M * K), ub(M * K);
      cpu::quantize_per_token_reference(xv, ip, view2(ua.data(), DType::kUInt8, M, K),
                                        view1(sa.data(), DType::kFloat32, M));
      ASSERT_TRUE(per_token(xv, ip, view2(ub.data(), DType::kUInt8, M, K),
                            view1(sb.data(), DType::kFloat32, M)));
      EXPECT_EQ(ua, ub);
      for (int64_t i = 0; i < M * K; ++i) ASSERT_EQ(int(ua[i]), int(qa[i]) + 128);
      EXPECT_EQ(sa[3], 1.0f);
      // The largest |value| of each token maps to +-127.
      for (int64_t m = 0; m < M; ++m) {
        if (m == 3) continue;
        int mx = 0;
        for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::abs(int(qa[m * K + k])));
        EXPECT_EQ(mx, 127);
      }
    }
  }
}

TEST(GemmInt8, StaticVectorPathsMatchReferenceBitForBit) {
  if (vector_quantizers().empty()) GTEST_SKIP() << "no AVX2";
  const int64_t M = 5, K = 77;
  std::vector<float> x = random_weights(M * K, 3), inv = smooth_factors(K, 9);
  for (const auto& fns : vector_quantizers())
  for (bool is_u8 : {true, false}) {
    for (bool smooth : {false, true}) {
      const DType qdt = is_u8 ? DType::kUInt8 : DType::kInt8;
      const int32_t zp = is_u8 ? 131 : 0;
      std::vector<uint8_t> qa(M * K), qb(M * K);
      TensorView xv = view2(x.data(), DType::kFloat32, M, K), iv = view1(inv.data(), DType::kFloat32, K);
      const TensorView* ip = smooth ? &iv : nullptr;
      // A scale small enough that the clamp is exercised on the outliers.
      cpu::quantize_static_reference(xv, ip, 0.03f, zp, view2(qa.data(), qdt, M, K));
      ASSERT_TRUE(fns.second(xv, ip, 0.03f, zp, view2(qb.data(), qdt, M, K)));
      EXPECT_EQ(qa, qb);
      int clamped = 0;
      for (uint8_t c : qa) clamped += is_u8 ? (c == 0 || c == 255) : (c == 0x80 || c == 0x7f);
      EXPECT_GT(clamped, 0);
    }
  }
}

// The vector quantizers divide by multiplying with 1/scale and one FMA correction
// (reciprocal_division.h): codes must still equal the reference's division on values a
// hair either side of a rounding tie, at extreme magnitudes, and for scales outside the
// range where the reciprocal is used.
TEST(GemmInt8, StaticCodesDivideExactlyNearTies) {
  if (vector_quantizers().empty()) GTEST_SKIP() << "no AVX2";
  std::mt19937 gen(7);
  for (float scale : {0.03f, 1.0f / 3.0f, 7.3e-3f, 0x1.fffffep-1f, 0x1p-64f, 1e-25f, 3e20f, 0x1p64f}) {
    std::vector<float> x;
    for (int k = -300; k <= 300; ++k) {
      float v = (static_cast<float>(k) + 0.5f) * scale;
      for (int step = 0; step < 3; ++step) {
        x.push_back(v);
        x.push_back(std::nextafter(v, INFINITY));
        x.push_back(std::nextafter(v, -INFINITY));
        v = std::nextafter(v, step % 2 ? INFINITY : -INFINITY);
      }
    }
    for (float v : {3e38f, -3e38f, 1e-40f, -1e-40f, 0.0f, -0.0f, 1e30f, -1e30f}) x.push_back(v);
    std::uniform_real_distribution<float> u(-300.0f, 300.0f);
    while (x.size() % 8 != 3) x.push_back(u(gen) * scale);  // a tail of 3 after 8- and 16-lane blocks
    const int64_t n = static_cast<int64_t>(x.size());
    for (const auto& fns : vector_quantizers())
    for (int64_t K : {int64_t{1}, n}) {  // K = 1: the elementwise split; K = n: one long row
      for (bool is_u8 : {true, false}) {
        const DType qdt = is_u8 ? DType::kUInt8 : DType::kInt8;
        const int32_t zp = is_u8 ? 128 : 0;
        std::vector<uint8_t> qa(n), qb(n);
        TensorView xv = view2(x.data(), DType::kFloat32, n / K, K);
        cpu::quantize_static_reference(xv, nullptr, scale, zp, view2(qa.data(), qdt, n / K, K));
        ASSERT_TRUE(fns.second(xv, nullptr, scale, zp, view2(qb.data(), qdt, n / K, K)));
        ASSERT_EQ(qa, qb) << "scale " << scale << " K " << K;
      }
    }
  }
}

TEST(GemmInt8, QuantizeRejectsNonFiniteAndBadArguments) {
  const int64_t M = 3, K = 20;
  std::vector<float> x(M * K, 1.0f), s(M);
  std::vector<int8_t> q(M * K);
  x[2 * K + 4] = NAN;
  TensorView xv = view2(x.data(), DType::kFloat32, M, K), qv = view2(q.data(), DType::kInt8, M, K);
  for (GemmBackend b : {GemmBackend::kReference, GemmBackend::kAuto}) {
    EXPECT_THROW(quantize_per_token(xv, nullptr, qv, view1(s.data(), DType::kFloat32, M), b), ValueError);
    EXPECT_THROW(quantize_static(xv, nullptr, 0.1f, 0, qv, b), ValueError);
  }
  x[2 * K + 4] = 0.0f;
  EXPECT_THROW(quantize_static(xv, nullptr, 0.0f, 0, qv, GemmBackend::kAuto), ValueError);
  EXPECT_THROW(quantize_static(xv, nullptr, 0.1f, 3, qv, GemmBackend::kAuto), ValueError);  // s8 zp
  EXPECT_THROW(quantize_per_token(xv, nullptr, qv, view1(s.data(), DType::kFloat32, M - 1),
                                  GemmBackend::kAuto), ValueError);
  EXPECT_THROW(quantize_per_token(xv, nullptr, view2(q.data(), DType::kFloat32, M, K),
                                  view1(s.data(), DType::kFloat32, M), GemmBackend::kAuto), TypeError);
}

struct Problem {
  int64_t M, K, N;
  bool is_u8, per_token, bias;
};

struct Data {
  std::vector<uint8_t> qx;
  std::vector<int8_t> w;
  std::vector<float> a_s, w_s, bias;
  int32_t zp;
  TensorView qxv, asv, wv, wsv, bv;
};

// full_range: codes and weights also take -128 (and u8 0 with zp 117 becomes -117 - 11),
// the values where an int16 pair sum saturates or a sign flip overflows.
Data make_data(const Problem& p, uint32_t seed, bool full_range = false) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> code(0, 255), wcode(full_range ? -128 : -127, 127);
  std::uniform_real_distribution<float> pos(0.001f, 0.02f), nrm(-1.0f, 1.0f);
  Data d;
  d.qx.resize(p.M * p.K);
  for (auto& c : d.qx) c = static_cast<uint8_t>(p.is_u8 ? code(gen) : static_cast<uint8_t>(wcode(gen)));
  d.w.resize(p.N * p.K);
  for (auto& c : d.w) c = static_cast<int8_t>(wcode(gen));
  d.a_s.resize(p.per_token ? p.M : 1);
  for (auto& s : d.a_s) s = pos(gen);
  d.w_s.resize(p.N);
  for (auto& s : d.w_s) s = pos(gen);
  d.bias.resize(p.N);
  for (auto& b : d.bias) b = nrm(gen);
  d.zp = p.is_u8 ? 117 : 0;
  const DType xdt = p.is_u8 ? DType::kUInt8 : DType::kInt8;
  d.qxv = view2(d.qx.data(), xdt, p.M, p.K);
  d.asv = view1(d.a_s.data(), DType::kFloat32, static_cast<int64_t>(d.a_s.size()));
  d.wv = view2(d.w.data(), DType::kInt8, p.N, p.K);
  d.wsv = view1(d.w_s.data(), DType::kFloat32, p.N);
  d.bv = view1(d.bias.data(), DType::kFloat32, p.N);
  return d;
}

const Problem kProblems[] = {
    {1, 64, 48, true, false, true},    {5, 384, 1152, true, false, false},
    {33, 100, 70, true, false, true},  {1, 256, 96, false, true, true},
    {17, 384, 384, false, true, true}, {64, 1536, 384, false, true, false},
    {9, 96, 40, false, false, true},   {12, 384, 200, true, true, true},  // u8 per token (zp 128)
};

TEST(GemmInt8, ReferenceMatchesFloat64Product) {
  for (const Problem& p : kProblems) {
    Data d = make_data(p, 1);
    std::vector<float> out(p.M * p.N);
    linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, p.bias ? &d.bv : nullptr,
                view2(out.data(), DType::kFloat32, p.M, p.N), GemmBackend::kReference);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = 0; n < p.N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < p.K; ++k) {
          const int a = p.is_u8 ? int(d.qx[m * p.K + k]) : int(static_cast<int8_t>(d.qx[m * p.K + k]));
          acc += double(a - d.zp) * d.w[n * p.K + k];
        }
        const double ref = acc * d.a_s[p.per_token ? m : 0] * d.w_s[n] + (p.bias ? d.bias[n] : 0.0);
        ASSERT_NEAR(out[m * p.N + n], ref, 1e-5 * (1.0 + std::fabs(ref))) << m << "," << n;
      }
  }
}

bool onednn_inexact(const std::string& impl) { return impl.find("not exact") != std::string::npos; }

// oneDNN runs only where its kernel is exact (VNNI/AMX); elsewhere the explicit backend
// refuses with a ValueError instead of returning saturated sums.
TEST(GemmInt8, OneDnnMatchesReferenceAndIsOptimized) {
  if (!cpu::onednn_usable()) GTEST_SKIP() << "a build without oneDNN";
  for (const Problem& p : kProblems) {
    Data d = make_data(p, 2, true);
    std::vector<float> ref(p.M * p.N), got(p.M * p.N, -1.0f);
    const TensorView* b = p.bias ? &d.bv : nullptr;
    linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, view2(ref.data(), DType::kFloat32, p.M, p.N),
                GemmBackend::kReference);
    const TensorView gv = view2(got.data(), DType::kFloat32, p.M, p.N);
    const std::string impl = cpu::linear_int8_onednn_impl(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, gv);
    ASSERT_FALSE(impl.empty());
    EXPECT_EQ(impl.find("ref"), std::string::npos) << impl;
    if (onednn_inexact(impl)) {
      EXPECT_THROW(linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, gv, GemmBackend::kOneDNN),
                   ValueError) << impl;
      continue;
    }
    linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, gv, GemmBackend::kOneDNN);
    for (int64_t i = 0; i < p.M * p.N; ++i)
      ASSERT_NEAR(got[i], ref[i], 2e-6 * (1.0 + std::fabs(ref[i]))) << "M=" << p.M << " i=" << i;
    if (have_avx512() && cpu::cpu_has_avx512_vnni())
      EXPECT_TRUE(cpu::onednn_int8_is_exact(impl)) << impl;
  }
}

// linear_int8_pack's layout for the active ISA, through linear_int8: our VNNI panels (AVX-512
// VNNI without AMX) or AVX2 panels (AVX2 where oneDNN's kernel is inexact: the avx2. ctest
// pass) bit for bit with the reference on both activation types at every row count;
// oneDNN's layout elsewhere. Each ISA of the machine (the layout follows it).
TEST(GemmInt8, PackedWeightsMatchReference) {
  for (cpu::Isa isa : testing::machine_isas()) {
    IsaScope scope(isa);
    for (const Problem& p : kProblems) {
      const std::string layout = linear_int8_packed_layout(p.K, p.N);
      const bool ours = layout == "vnni_panels" || layout == "avx2_panels";
      if (!p.is_u8 && !ours) continue;  // oneDNN's packed weights serve uint8 activations
      Data d = make_data(p, 4, true);
      const int64_t bytes = linear_int8_packed_bytes(p.K, p.N);
      if (bytes == 0) {  // only where oneDNN's kernel is inexact: ours runs on plain weights
        std::vector<float> o(p.M * p.N);
        EXPECT_TRUE(!cpu::onednn_usable() || onednn_inexact(cpu::linear_int8_onednn_impl(
            d.qxv, d.asv, d.zp, d.wv, d.wsv, nullptr, view2(o.data(), DType::kFloat32, p.M, p.N))));
        continue;
      }
      ASSERT_GE(bytes, p.K * p.N);
      std::vector<uint8_t> packed(bytes);
      const TensorView pv = view1(packed.data(), DType::kUInt8, bytes);
      linear_int8_pack(d.wv, pv);
      std::vector<float> ref(p.M * p.N);
      const TensorView* b = p.bias ? &d.bv : nullptr;
      linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, view2(ref.data(), DType::kFloat32, p.M, p.N),
                  GemmBackend::kReference);
      for (GemmBackend be : {GemmBackend::kAuto, GemmBackend::kNative, GemmBackend::kOneDNN}) {
        if (be == GemmBackend::kNative && !ours) continue;  // native reads the plain weight
        if (be == GemmBackend::kOneDNN && (ours || !p.is_u8)) continue;  // it reads only its own layout
        std::vector<float> got(p.M * p.N, -1.0f);
        const TensorView gv = view2(got.data(), DType::kFloat32, p.M, p.N);
        linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, gv, be, &pv);
        for (int64_t i = 0; i < p.M * p.N; ++i) {
          if (ours)
            ASSERT_EQ(got[i], ref[i]) << cpu::isa_name(isa) << " M=" << p.M << " i=" << i;
          else
            ASSERT_NEAR(got[i], ref[i], 2e-6 * (1.0 + std::fabs(ref[i]))) << "M=" << p.M << " i=" << i;
        }
      }
    }
  }
}

// oneDNN's own blocked layout, wherever its kernel is exact (read by kOneDNN).
TEST(GemmInt8, OneDnnPackedWeightsMatchReference) {
  for (const Problem& p : kProblems) {
    if (!p.is_u8) continue;
    const int64_t bytes = cpu::linear_int8_packed_bytes_onednn(p.K, p.N);
    if (bytes == 0) continue;
    Data d = make_data(p, 4);
    std::vector<uint8_t> packed(bytes);
    const TensorView pv = view1(packed.data(), DType::kUInt8, bytes);
    cpu::linear_int8_pack_onednn(d.wv, pv);
    std::vector<float> ref(p.M * p.N), got(p.M * p.N, -1.0f);
    const TensorView* b = p.bias ? &d.bv : nullptr;
    linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, view2(ref.data(), DType::kFloat32, p.M, p.N),
                GemmBackend::kReference);
    const TensorView gv = view2(got.data(), DType::kFloat32, p.M, p.N);
    ASSERT_TRUE(cpu::linear_int8_onednn(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, gv, &pv));
    for (int64_t i = 0; i < p.M * p.N; ++i)
      ASSERT_NEAR(got[i], ref[i], 2e-6 * (1.0 + std::fabs(ref[i]))) << "M=" << p.M << " i=" << i;
    const std::string impl = cpu::linear_int8_onednn_impl(d.qxv, d.asv, d.zp, d.wv, d.wsv, b, gv, &pv);
    EXPECT_NE(impl.find("packed"), std::string::npos) << impl;
    EXPECT_EQ(impl.find("ref"), std::string::npos) << impl;
  }
}

// A packed buffer of the wrong size, or one whose header names another weight or layout, is
// refused rather than read; our VNNI panels packed under AVX-512 and handed to AVX2's kernels
// (set_isa between pack and call) are refused or, where AVX2 packs nothing, not read. Our
// AVX2 panels (the avx2. pass) likewise.
TEST(GemmInt8, PackedWeightsOfAnotherKindAreRefused) {
  const Problem p{16, 64, 32, true, false, true};
  Data d = make_data(p, 5);
  std::vector<float> out(p.M * p.N), ref(p.M * p.N);
  const TensorView ov = view2(out.data(), DType::kFloat32, p.M, p.N);
  linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, view2(ref.data(), DType::kFloat32, p.M, p.N),
              GemmBackend::kReference);
  const int64_t bytes = linear_int8_packed_bytes(p.K, p.N);
  if (bytes == 0) GTEST_SKIP() << "no packed layout here";
  std::vector<uint8_t> small(10), packed(bytes), zeros(bytes, 0);
  const TensorView sv = view1(small.data(), DType::kUInt8, 10), pv = view1(packed.data(), DType::kUInt8, bytes),
                   zv = view1(zeros.data(), DType::kUInt8, bytes);
  EXPECT_THROW(linear_int8_pack(d.wv, sv), ValueError);
  EXPECT_THROW(linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto, &sv), ValueError);
  const std::string layout = linear_int8_packed_layout(p.K, p.N);
  if (layout != "vnni_panels" && layout != "avx2_panels") return;  // oneDNN's has no header
  linear_int8_pack(d.wv, pv);
  linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto, &pv);
  EXPECT_EQ(out, ref);
  if (layout == "vnni_panels") {
    IsaScope avx2(cpu::Isa::kAVX2);
    std::fill(out.begin(), out.end(), -1.0f);
    if (linear_int8_packed_bytes(p.K, p.N) == 0) {
      linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto, &pv);
      EXPECT_EQ(out, ref);
    } else {
      EXPECT_THROW(linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto, &pv), ValueError);
    }
  }
  EXPECT_THROW(linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto, &zv), ValueError);
  const int64_t other_k = p.K + 1;  // the header of a weight of another shape
  std::memcpy(packed.data() + 8, &other_k, sizeof(other_k));
  EXPECT_THROW(linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto, &pv), ValueError);
}

// Our kernels on every vector ISA here (AVX-512: the VNNI kernel below kInt8VnniMaxRows rows
// where the CPU has VNNI; AVX2: what AVX2 CPUs without VNNI run) equal the reference bit for
// bit, on every code and weight value and on odd K (tails).
TEST(GemmInt8, NativeMatchesReferenceBitForBit) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  for (cpu::Isa isa : testing::machine_isas())
  for (const Problem& p : kProblems)
    for (bool full : {false, true}) {
      if (isa == cpu::Isa::kScalar) continue;
      IsaScope scope(isa);
      Data d = make_data(p, 6, full);
      std::vector<float> ref(p.M * p.N), got(p.M * p.N, -1.0f);
      const TensorView* b = p.bias ? &d.bv : nullptr;
      linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b,
                  view2(ref.data(), DType::kFloat32, p.M, p.N), GemmBackend::kReference);
      linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, b,
                  view2(got.data(), DType::kFloat32, p.M, p.N), GemmBackend::kNative);
      for (int64_t i = 0; i < p.M * p.N; ++i)
        ASSERT_EQ(got[i], ref[i]) << cpu::isa_name(isa) << " M=" << p.M << " K=" << p.K
                                  << " full=" << full << " i=" << i;
    }
}

// The VNNI kernels add u8 codes as they are and subtract zp * (weight row sum): every zero
// point, s8 codes (flipped to u8), K on and off 64-byte steps and 4-byte panel steps, rows
// over the GEMV's 4 x 4 tiles and the panels' 6-token tiles, weight rows not a multiple of 4
// or 16 (or 64, the panels' task), and the panels packed once (linear_int8_vnni_pack) as well
// as per call. The kernels take any row count; linear_int8 picks by rows.
TEST(GemmInt8, VnniKernelsMatchReferenceBitForBit) {
  if (!cpu::int8_vnni_available()) GTEST_SKIP() << "no AVX-512 VNNI";
  using Kernel = std::function<bool(const TensorView&, const TensorView&, int32_t, const TensorView&,
                                    const TensorView&, const TensorView*, const TensorView&)>;
  std::vector<uint8_t> packed;
  const Kernel prepacked = [&](const TensorView& qx, const TensorView& as, int32_t zp, const TensorView& w,
                               const TensorView& ws, const TensorView* b, const TensorView& out) {
    packed.assign(cpu::linear_int8_vnni_packed_bytes(w.shape[1], w.shape[0]), 0xA5);  // no zeros left
    cpu::linear_int8_vnni_pack(w, view1(packed.data(), DType::kUInt8, static_cast<int64_t>(packed.size())));
    return cpu::linear_int8_vnni_panels(qx, as, zp, w, ws, b, out, packed.data());
  };
  const std::pair<const char*, Kernel> kernels[] = {
      {"gemv", cpu::linear_int8_vnni},
      {"panels", [](const TensorView& qx, const TensorView& as, int32_t zp, const TensorView& w,
                    const TensorView& ws, const TensorView* b, const TensorView& out) {
         return cpu::linear_int8_vnni_panels(qx, as, zp, w, ws, b, out);
       }},
      {"prepacked panels", prepacked}};
  uint32_t seed = 30;
  for (int64_t M : {1, 2, 3, 5, 8, 9, 15, 17, 39})
    for (int64_t K : {1, 3, 63, 64, 66, 200, 387})
      for (bool is_u8 : {true, false}) {
        const int64_t N = 4 * (M % 3) + 16 * (K % 2) + 19 + (M == 17 ? 47 : 0);  // past 64: 2 tasks
        Data d = make_data({M, K, N, is_u8, M % 2 == 0, M != 3}, ++seed, true);
        for (int32_t zp : is_u8 ? std::vector<int32_t>{0, 117, 255} : std::vector<int32_t>{0}) {
          std::vector<float> ref(M * N);
          const TensorView* b = M != 3 ? &d.bv : nullptr;
          linear_int8(d.qxv, d.asv, zp, d.wv, d.wsv, b, view2(ref.data(), DType::kFloat32, M, N),
                      GemmBackend::kReference);
          for (const auto& [name, kernel] : kernels) {
            std::vector<float> got(M * N, -1.0f);
            ASSERT_TRUE(kernel(d.qxv, d.asv, zp, d.wv, d.wsv, b, view2(got.data(), DType::kFloat32, M, N)));
            for (int64_t i = 0; i < M * N; ++i)
              ASSERT_EQ(got[i], ref[i]) << name << " M=" << M << " K=" << K << " N=" << N
                                        << " u8=" << is_u8 << " zp=" << zp << " i=" << i;
          }
        }
      }
}

// The AVX2 panels packed once (linear_int8_avx2_pack, what layers hold on AVX2 CPUs whose
// oneDNN kernel is inexact): with every weight code in [-64, 64] the header says so and the
// uint8 codes are multiplied as they are, including the pairs at the int16 edge (255 x 64 +
// 255 x 64 = 32640) and s8 codes flipped to u8; one code of 65 or -65 takes the sign-product
// path. Every zero point, K and N tails, rows around the 6-row narrow tiles and the 64-row
// tasks. Bit-exact with the reference; the pack writes every byte of a 0xA5-filled buffer.
TEST(GemmInt8, Avx2PackedPanelsMatchReferenceBitForBit) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  IsaScope scope(cpu::Isa::kAVX2);
  uint32_t seed = 70;
  for (int64_t M : {1, 2, 5, 6, 7, 12, 13, 64, 70})
    for (int64_t K : {1, 3, 4, 65, 130, 387})
      for (bool is_u8 : {true, false})
        for (int wide : {0, 1, 2}) {  // 0: codes in [-64, 64], 1: one 65, 2: one -65
          const int64_t N = 8 * (M % 3) + (K % 5) + 9;
          Data d = make_data({M, K, N, is_u8, M % 2 == 0, K != 3}, ++seed);
          for (auto& c : d.w) c = static_cast<int8_t>(std::clamp<int>(c, -64, 64));
          if (M == 7) std::fill(d.w.begin(), d.w.begin() + K, 64);  // row 0 at the int16 edge with q = 255
          if (M == 7 && is_u8) std::fill(d.qx.begin(), d.qx.begin() + K, 255);
          if (wide) d.w[d.w.size() / 2] = static_cast<int8_t>(wide == 1 ? 65 : -65);
          const int64_t bytes = cpu::linear_int8_avx2_packed_bytes(K, N);
          std::vector<uint8_t> packed(bytes + 64, 0xA5);
          cpu::linear_int8_avx2_pack(d.wv, view1(packed.data(), DType::kUInt8, bytes));
          ASSERT_TRUE(cpu::linear_int8_avx2_packed_matches(packed.data(), K, N));
          ASSERT_FALSE(cpu::linear_int8_avx2_packed_matches(packed.data(), K + 1, N));
          int64_t narrow = -1;
          std::memcpy(&narrow, packed.data() + 24, sizeof(narrow));
          EXPECT_EQ(narrow, wide ? 0 : 1) << "K=" << K << " wide=" << wide;
          for (int64_t i = bytes; i < bytes + 64; ++i) ASSERT_EQ(packed[i], 0xA5) << "past the copy";
          const int64_t N8 = (N + 7) / 8;
          for (int64_t i = 0; i < bytes - 4 * N8 * 8; ++i)  // 0xA5 (-91) is no code here, nor in the header
            ASSERT_NE(packed[i], 0xA5) << "byte " << i << " of the header and panels unwritten";
          for (int64_t n = 0; n < N8 * 8; ++n) {  // the row sums end the copy, 0 past N
            int32_t sum = 0, want = 0;
            std::memcpy(&sum, packed.data() + bytes - 4 * (N8 * 8 - n), sizeof(sum));
            for (int64_t k = 0; n < N && k < K; ++k) want += d.w[n * K + k];
            ASSERT_EQ(sum, want) << "row " << n;
          }
          for (int32_t zp : is_u8 ? std::vector<int32_t>{0, 128, 255} : std::vector<int32_t>{0})
            for (bool vnni : avx2_vnni_settings()) {
              Avx2VnniScope dot(vnni);
              std::vector<float> ref(M * N), got(M * N, -1.0f);
              const TensorView* b = K != 3 ? &d.bv : nullptr;
              linear_int8(d.qxv, d.asv, zp, d.wv, d.wsv, b, view2(ref.data(), DType::kFloat32, M, N),
                          GemmBackend::kReference);
              ASSERT_TRUE(cpu::linear_int8_panels_avx2(d.qxv, d.asv, zp, d.wv, d.wsv, b,
                                                       view2(got.data(), DType::kFloat32, M, N), packed.data()));
              for (int64_t i = 0; i < M * N; ++i)
                ASSERT_EQ(got[i], ref[i]) << "M=" << M << " K=" << K << " N=" << N << " u8=" << is_u8
                                          << " zp=" << zp << " wide=" << wide << " vnni=" << vnni << " i=" << i;
            }
        }
}

// With vpdpbusd (AVX-VNNI, or AVX512-VNNI's EVEX form standing in) the AVX2 panels multiply
// the codes as they are whatever their range: full-range weights (-128 and 127 included)
// against u8 255 / s8 -128 (the pairs vpmaddubsw would saturate), every zero point, K tails,
// 1-3 rows (two sets of accumulators) up to 70 (6-row tiles, 64-row tasks); from a packed copy
// and packed per call (row sums made then). Bit-exact with the reference. The layout is our
// AVX2 panels whatever oneDNN's kernel, and the ISA API reports the form.
TEST(GemmInt8, Avx2VnniPanelsTakeAnyCodesBitForBit) {
  if (!cpu::avx2_vnni_available()) GTEST_SKIP() << "neither AVX-VNNI nor AVX512-VNNI";
  IsaScope scope(cpu::Isa::kAVX2);
  Avx2VnniScope dot(true);
  EXPECT_EQ(cpu::avx2_vnni(), cpu::cpu_has_avx_vnni() ? cpu::AvxVnni::kVex : cpu::AvxVnni::kEvex);
  EXPECT_STREQ(linear_int8_packed_layout(384, 1536), "avx2_panels");
  EXPECT_TRUE(linear_int8_packing_pays());
  uint32_t seed = 170;
  for (int64_t M : {1, 2, 3, 4, 7, 13, 64, 70})
    for (int64_t K : {1, 5, 64, 387})
      for (bool is_u8 : {true, false}) {
        const int64_t N = 8 * (M % 3) + (K % 5) + 9;
        Data d = make_data({M, K, N, is_u8, M % 2 == 0, K != 5}, ++seed);
        std::mt19937 rng(seed);
        for (auto& c : d.w) c = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
        if (M == 7) {  // row 0 all 127 and row 1 all -128 against all-255 (u8) / all -128 (s8) codes
          std::fill(d.w.begin(), d.w.begin() + K, 127);
          std::fill(d.w.begin() + K, d.w.begin() + 2 * K, -128);
          std::fill(d.qx.begin(), d.qx.begin() + K, is_u8 ? 255 : 0x80);
        }
        std::vector<uint8_t> packed(cpu::linear_int8_avx2_packed_bytes(K, N));
        cpu::linear_int8_avx2_pack(d.wv, view1(packed.data(), DType::kUInt8, static_cast<int64_t>(packed.size())));
        for (int32_t zp : is_u8 ? std::vector<int32_t>{0, 37, 255} : std::vector<int32_t>{0})
          for (const uint8_t* pk : {static_cast<const uint8_t*>(packed.data()), static_cast<const uint8_t*>(nullptr)}) {
            std::vector<float> ref(M * N), got(M * N, -1.0f);
            const TensorView* b = K != 5 ? &d.bv : nullptr;
            linear_int8(d.qxv, d.asv, zp, d.wv, d.wsv, b, view2(ref.data(), DType::kFloat32, M, N),
                        GemmBackend::kReference);
            ASSERT_TRUE(cpu::linear_int8_panels_avx2(d.qxv, d.asv, zp, d.wv, d.wsv, b,
                                                     view2(got.data(), DType::kFloat32, M, N), pk));
            ASSERT_EQ(got, ref) << "M=" << M << " K=" << K << " N=" << N << " u8=" << is_u8 << " zp=" << zp
                                << " packed=" << (pk != nullptr);
          }
      }
  {
    IsaScope best(cpu::best_isa());
    if (cpu::best_isa() != cpu::Isa::kAVX2) EXPECT_EQ(cpu::avx2_vnni(), cpu::AvxVnni::kNone) << "only the AVX2 paths";
  }
  Avx2VnniScope off(false);
  EXPECT_EQ(cpu::avx2_vnni(), cpu::AvxVnni::kNone);
}

// Without a packed copy, a weight of kInt8LargeWeight values and full-range codes: with
// vpdpbusd the panels (packed per call, row sums made then) from 32 rows, below that the
// GEMV; both the reference's bits, also on a second call (the reused per-call buffer).
TEST(GemmInt8, Avx2VnniLargeWeightWithoutPackedCopyIsExact) {
  if (!cpu::avx2_vnni_available()) GTEST_SKIP() << "neither AVX-VNNI nor AVX512-VNNI";
  IsaScope scope(cpu::Isa::kAVX2);
  Avx2VnniScope dot(true);
  const int64_t K = 4096, N = cpu::kInt8LargeWeight / K;
  const struct { int64_t M; uint32_t seed; } calls[] = {{3, 121}, {33, 122}, {33, 123}, {70, 124}};
  for (const auto& c : calls) {  // the two 33-row calls: other weights in the same buffer
    const int64_t M = c.M;
    Data d = make_data({M, K, N, true, true, true}, c.seed);
    std::vector<float> ref(M * N), got(M * N, -1.0f);
    linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, view2(ref.data(), DType::kFloat32, M, N),
                GemmBackend::kReference);
    ASSERT_TRUE(cpu::linear_int8_avx2(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, view2(got.data(), DType::kFloat32, M, N)));
    ASSERT_EQ(got, ref) << "M=" << M;
  }
}

// Where the CPU has no form of vpdpbusd, asking for it is refused and changes nothing.
TEST(GemmInt8, Avx2VnniRefusedWithoutVnni) {
  if (cpu::avx2_vnni_available()) {
    EXPECT_NO_THROW(cpu::set_avx2_vnni(cpu::cpu_has_avx_vnni()));  // the default, restored
    GTEST_SKIP() << "this CPU has a form of vpdpbusd";
  }
  EXPECT_THROW(cpu::set_avx2_vnni(true), ValueError);
  IsaScope scope(cpu::best_isa());
  EXPECT_EQ(cpu::avx2_vnni(), cpu::AvxVnni::kNone);
}

// Through linear_int8 where the layout is our AVX2 panels (the avx2. pass): a weight of
// kInt8LargeWeight values with full-range codes runs the GEMV on the plain weight at every row
// count, narrow codes the panels; both bit-exact.
TEST(GemmInt8, Avx2PanelsDispatchOnLargeWeightsIsExact) {
  const int64_t K = 4096, N = cpu::kInt8LargeWeight / K;
  if (std::string(linear_int8_packed_layout(K, N)) != "avx2_panels") GTEST_SKIP() << "no AVX2 panels here";
  for (bool wide : {true, false})
    for (int64_t M : {2, 33}) {
      Data d = make_data({M, K, N, true, true, true}, 90 + M);
      if (!wide)
        for (auto& c : d.w) c = static_cast<int8_t>(std::clamp<int>(c, -64, 64));
      std::vector<uint8_t> packed(linear_int8_packed_bytes(K, N));
      const TensorView pv = view1(packed.data(), DType::kUInt8, static_cast<int64_t>(packed.size()));
      linear_int8_pack(d.wv, pv);
      ASSERT_EQ(cpu::linear_int8_avx2_packed_narrow(packed.data()), !wide);
      std::vector<float> ref(M * N), got(M * N, -1.0f);
      linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, view2(ref.data(), DType::kFloat32, M, N),
                  GemmBackend::kReference);
      linear_int8(d.qxv, d.asv, d.zp, d.wv, d.wsv, &d.bv, view2(got.data(), DType::kFloat32, M, N),
                  GemmBackend::kAuto, &pv);
      ASSERT_EQ(got, ref) << "wide=" << wide << " M=" << M;
    }
}

// The inputs where vpmaddubsw saturates: u8 255 (zero point 0) against weights 127 / -128,
// and s8 -128 against -128. Both automatic and native paths give the exact sums.
TEST(GemmInt8, SaturatingPairsAreExact) {
  const int64_t M = 3, K = 67, N = 5;
  for (bool is_u8 : {true, false}) {
    std::vector<uint8_t> qx(M * K, is_u8 ? 255 : 0x80);
    std::vector<int8_t> w(N * K);
    for (int64_t i = 0; i < N * K; ++i) w[i] = static_cast<int8_t>(i % 3 == 0 ? 127 : -128);
    std::vector<float> as(1, 1.0f), ws(N, 1.0f);
    const TensorView qv = view2(qx.data(), is_u8 ? DType::kUInt8 : DType::kInt8, M, K);
    for (GemmBackend be : {GemmBackend::kAuto, GemmBackend::kNative}) {
      if (be == GemmBackend::kNative && cpu::active_isa() < cpu::Isa::kAVX2) continue;  // none below AVX2
      std::vector<float> out(M * N);
      linear_int8(qv, view1(as.data(), DType::kFloat32, 1), 0, view2(w.data(), DType::kInt8, N, K),
                  view1(ws.data(), DType::kFloat32, N), nullptr,
                  view2(out.data(), DType::kFloat32, M, N), be);
      for (int64_t n = 0; n < N; ++n) {
        int64_t want = 0;
        for (int64_t k = 0; k < K; ++k) want += int64_t(is_u8 ? 255 : -128) * w[n * K + k];
        for (int64_t m = 0; m < M; ++m) ASSERT_EQ(out[m * N + n], float(want)) << n;
      }
    }
  }
}

// Both AVX2 kernels (the GEMV below kInt8PanelMinRows rows, the panel GEMM from there) shift u8
// codes by 128 or 127, whichever leaves fewer codes to correct: post-ReLU-like activations
// (zp 0, a third of the codes 0) and the mirror case (many 255), s8 codes with many -128, on
// K and N tails. Bit-exact.
TEST(GemmInt8, ClampedCodesAreCorrectedBitForBit) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  struct Case {
    int64_t M, K, N;
    bool is_u8;
    int32_t zp;
    uint8_t common;  // a third of the codes
  };
  const Case cases[] = {{cpu::kInt8PanelMinRows, 75, 21, true, 0, 0},
                        {40, 384, 40, true, 200, 255},
                        {23, 33, 9, false, 0, 0x80},
                        {70, 130, 17, true, 128, 0},
                        {3, 75, 21, true, 0, 0},
                        {5, 100, 9, true, 200, 255},
                        {1, 33, 7, false, 0, 0x80}};
  for (const Case& c : cases) {
    std::mt19937 gen(11);
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<uint8_t> qx(c.M * c.K);
    for (auto& q : qx) q = gen() % 3 == 0 ? c.common : static_cast<uint8_t>(byte(gen));
    std::vector<int8_t> w(c.N * c.K);
    for (auto& v : w) v = static_cast<int8_t>(byte(gen) - 128);
    std::vector<float> as(c.M), ws(c.N), bias(c.N);
    for (auto& v : as) v = 0.001f * (1 + gen() % 17);
    for (auto& v : ws) v = 0.002f * (1 + gen() % 13);
    for (auto& v : bias) v = 0.1f * (static_cast<int>(gen() % 21) - 10);
    const TensorView qv = view2(qx.data(), c.is_u8 ? DType::kUInt8 : DType::kInt8, c.M, c.K);
    const TensorView av = view1(as.data(), DType::kFloat32, c.M), wv = view2(w.data(), DType::kInt8, c.N, c.K);
    const TensorView wsv = view1(ws.data(), DType::kFloat32, c.N), bv = view1(bias.data(), DType::kFloat32, c.N);
    std::vector<float> ref(c.M * c.N), got(c.M * c.N, -1.0f);
    linear_int8(qv, av, c.zp, wv, wsv, &bv, view2(ref.data(), DType::kFloat32, c.M, c.N), GemmBackend::kReference);
    IsaScope scope(cpu::Isa::kAVX2);  // the AVX2 kernels, also on AVX-512 machines
    linear_int8(qv, av, c.zp, wv, wsv, &bv, view2(got.data(), DType::kFloat32, c.M, c.N), GemmBackend::kNative);
    for (int64_t i = 0; i < c.M * c.N; ++i) ASSERT_EQ(got[i], ref[i]) << "M=" << c.M << " K=" << c.K << " i=" << i;
  }
}

TEST(GemmInt8, EmptyReductionGivesTheBias) {
  std::vector<uint8_t> qx(1);
  std::vector<int8_t> w(1);
  std::vector<float> as(1, 1.0f), ws(3, 1.0f), bias = {1.5f, -2.0f, 0.25f}, out(6, NAN);
  for (GemmBackend be : {GemmBackend::kAuto, GemmBackend::kReference, GemmBackend::kNative}) {
    linear_int8(view2(qx.data(), DType::kUInt8, 2, 0), view1(as.data(), DType::kFloat32, 1), 128,
                view2(w.data(), DType::kInt8, 3, 0), view1(ws.data(), DType::kFloat32, 3),
                nullptr, view2(out.data(), DType::kFloat32, 2, 3), be);
    for (float v : out) EXPECT_EQ(v, 0.0f);
    const TensorView bv = view1(bias.data(), DType::kFloat32, 3);
    linear_int8(view2(qx.data(), DType::kUInt8, 2, 0), view1(as.data(), DType::kFloat32, 1), 128,
                view2(w.data(), DType::kInt8, 3, 0), view1(ws.data(), DType::kFloat32, 3), &bv,
                view2(out.data(), DType::kFloat32, 2, 3), be);
    for (int i = 0; i < 6; ++i) EXPECT_EQ(out[i], bias[i % 3]);
  }
}

TEST(GemmInt8, LinearRejectsBadArguments) {
  Problem p{4, 32, 8, true, false, true};
  Data d = make_data(p, 3);
  std::vector<float> out(p.M * p.N), bad_scales(3);
  const TensorView ov = view2(out.data(), DType::kFloat32, p.M, p.N);
  EXPECT_THROW(linear_int8(d.qxv, d.asv, 300, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto), ValueError);
  EXPECT_THROW(linear_int8(d.qxv, view1(bad_scales.data(), DType::kFloat32, 3), d.zp, d.wv, d.wsv,
                           &d.bv, ov, GemmBackend::kAuto), ValueError);
  TensorView short_w = view2(d.w.data(), DType::kInt8, p.N, p.K - 1);
  EXPECT_THROW(linear_int8(d.qxv, d.asv, d.zp, short_w, d.wsv, &d.bv, ov, GemmBackend::kAuto), ValueError);
  TensorView u8_w = view2(d.w.data(), DType::kUInt8, p.N, p.K);
  EXPECT_THROW(linear_int8(d.qxv, d.asv, d.zp, u8_w, d.wsv, &d.bv, ov, GemmBackend::kAuto), TypeError);
  TensorView s8_x = d.qxv;
  s8_x.dtype = DType::kInt8;
  EXPECT_THROW(linear_int8(s8_x, d.asv, 5, d.wv, d.wsv, &d.bv, ov, GemmBackend::kAuto), ValueError);
}

}  // namespace
}  // namespace tensorslim
