// Binary / ternary / XNOR linears: each AVX-512 and AVX2 path against the scalar reference,
// and the reference against an independent float64 / integer computation from unpacked signs.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "tensorslim/binary.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::view1;
using testing::view2;

// Sizes that exercise every tail: K not a multiple of 8 (partial byte), of 16 (partial
// float vector), of 512 (partial popcount vector); N not a multiple of the 4-row tile.
const int64_t kKs[] = {1, 7, 9, 16, 63, 100, 511, 512, 513, 1031, 2050};
constexpr int64_t kN = 11;

// The vector ISAs this CPU runs; each native test runs on every one (set_isa), and puts the
// active ISA back afterwards.
std::vector<cpu::Isa> vector_isas() {
  std::vector<cpu::Isa> out;
  if (cpu::best_isa() >= cpu::Isa::kAVX2) out.push_back(cpu::Isa::kAVX2);
  if (cpu::best_isa() >= cpu::Isa::kAVX512) out.push_back(cpu::Isa::kAVX512);
  return out;
}
struct IsaGuard {
  cpu::Isa saved = cpu::active_isa();
  ~IsaGuard() { cpu::set_isa(saved); }
};


// Random packed rows whose padding bits are random too (kernels must ignore them).
std::vector<uint8_t> random_bytes(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(gen());
  return v;
}

int sign_at(const std::vector<uint8_t>& bits, int64_t row_bytes, int64_t r, int64_t k) {
  return (bits[r * row_bytes + k / 8] >> (k % 8)) & 1 ? 1 : -1;
}

// Ternary codes from random trits (never the unused code 0b10), random padding.
std::vector<uint8_t> random_trits(int64_t N, int64_t K, uint32_t seed, std::vector<int>& t) {
  std::mt19937 gen(seed);
  const int64_t rb = (K + 3) / 4;
  std::vector<uint8_t> codes = random_bytes(N * rb, seed + 1);
  t.assign(N * K, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int v = static_cast<int>(gen() % 3) - 1;
      t[n * K + k] = v;
      uint8_t& b = codes[n * rb + k / 4];
      const int sh = 2 * (k % 4);
      b = static_cast<uint8_t>((b & ~(3 << sh)) | ((v & 3) << sh));
    }
  return codes;
}

TEST(Binary, XnorDotsExactOnEveryPath) {
  for (int64_t K : kKs) {
    const int64_t rb = (K + 7) / 8;
    for (int64_t M = 1; M <= 17; ++M) {
      std::vector<uint8_t> a = random_bytes(M * rb, 3 + K), w = random_bytes(kN * rb, 7 + K);
      std::vector<int32_t> want(M * kN);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < kN; ++n) {
          int32_t dot = 0;
          for (int64_t k = 0; k < K; ++k) dot += sign_at(a, rb, m, k) * sign_at(w, rb, n, k);
          want[m * kN + n] = dot;
        }
      auto run = [&](GemmBackend be) {
        std::vector<int32_t> got(M * kN, 12345);
        xnor_dots(view2(a.data(), DType::kUInt8, M, rb), view2(w.data(), DType::kUInt8, kN, rb), K,
                  view2(got.data(), DType::kInt32, M, kN), be);
        return got;
      };
      EXPECT_EQ(run(GemmBackend::kReference), want) << "K=" << K << " M=" << M;
      IsaGuard guard;
      for (cpu::Isa isa : vector_isas()) {
        cpu::set_isa(isa);
        EXPECT_EQ(run(GemmBackend::kNative), want)
            << cpu::isa_name(isa) << " vpopcntdq=" << cpu::has_vpopcntdq() << " K=" << K << " M=" << M;
        if (isa != cpu::Isa::kAVX512) continue;
        cpu::set_vpopcntdq_enabled(false);  // the VPSHUFB fallback
        EXPECT_EQ(run(GemmBackend::kNative), want) << "nibble table, K=" << K << " M=" << M;
        cpu::set_vpopcntdq_enabled(true);
      }
    }
  }
}

TEST(Binary, BinarizeRows) {
  const int64_t M = 3, K = 21, rb = 8;  // rows wider than ceil(K/8) = 3: the rest is zeroed
  std::vector<float> x = random_weights(M * K, 5);
  x[4] = 0.0f;  // 0 counts as +1
  std::vector<uint8_t> bits(M * rb, 0xAB);
  std::vector<float> scale(M);
  binarize_rows(view2(x.data(), DType::kFloat32, M, K), view2(bits.data(), DType::kUInt8, M, rb),
                view1(scale.data(), DType::kFloat32, M));
  for (int64_t m = 0; m < M; ++m) {
    double s = 0;
    for (int64_t k = 0; k < K; ++k) {
      EXPECT_EQ(sign_at(bits, rb, m, k), x[m * K + k] >= 0 ? 1 : -1);
      s += std::fabs(x[m * K + k]);
    }
    for (int64_t k = K; k < rb * 8; ++k) EXPECT_EQ((bits[m * rb + k / 8] >> (k % 8)) & 1, 0);
    EXPECT_EQ(scale[m], static_cast<float>(s / K));
  }
}

// Float64 y = scale * sum_k x * t + bias from unpacked weights, and the summation error
// bound of a float32 kernel: accumulating n terms in fp32 errs by at most n * 2^-24 of
// sum |x|. A kernel of L lanes adds K/L terms per lane then L lanes (+log2 L levels: 4 for
// AVX-512, 3 for AVX2); the binary kernel forms 2P - S from two such sums (3x), one more
// rounding for the scale/bias step. The reference sums in double, so its own error is
// negligible (it is held to the looser AVX2 bound).
struct Expect {
  std::vector<double> y, bound;
};

Expect expected(const std::vector<float>& x, const std::vector<int>& t, const std::vector<float>& s,
                const std::vector<float>& bias, int64_t M, int64_t K, double sums, int lanes) {
  Expect e{std::vector<double>(M * kN), std::vector<double>(M * kN)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < kN; ++n) {
      double acc = 0, absx = 0;
      for (int64_t k = 0; k < K; ++k) {
        acc += (double)x[m * K + k] * t[n * K + k];
        absx += std::fabs(x[m * K + k]);
      }
      const double y = acc * s[n] + bias[n];
      e.y[m * kN + n] = y;
      e.bound[m * kN + n] = sums * (double(K) / lanes + std::log2(lanes) + 2) * std::ldexp(1.0, -24) * absx * s[n] +
                            std::ldexp(std::fabs(y) + std::fabs(bias[n]), -22);
    }
  return e;
}

// The reference (as kScalar), then the native kernel of every vector ISA.
std::vector<cpu::Isa> native_runs() {
  std::vector<cpu::Isa> out = vector_isas();
  out.insert(out.begin(), cpu::Isa::kScalar);
  return out;
}

// Batches of the tiles (1-17 rows) and of the panel GEMM (64+ rows, kBinaryPanelMinRows).
const int64_t kBatches[] = {1, 2, 3, 4, 5, 9, 13, 17, 64, 71};

// The lanes a kernel's sums are split over: from 64 rows the panel GEMM adds every product of
// an output in one accumulator (the bound of one lane).
int kernel_lanes(cpu::Isa isa, int64_t M) { return M >= 64 ? 1 : isa == cpu::Isa::kAVX512 ? 16 : 8; }

void expect_close(const std::vector<float>& got, const Expect& e, const char* what, int64_t K) {
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_LE(std::fabs(got[i] - e.y[i]), e.bound[i]) << what << " K=" << K << " at " << i;
}

TEST(Binary, BinaryWeightLinearMatchesFloat64) {
  for (int64_t K : kKs) {
    const int64_t rb = (K + 7) / 8;
    std::vector<uint8_t> w = random_bytes(kN * rb, 11 + K);
    std::vector<int> t(kN * K);
    for (int64_t n = 0; n < kN; ++n)
      for (int64_t k = 0; k < K; ++k) t[n * K + k] = sign_at(w, rb, n, k);
    std::vector<float> s = random_weights(kN, 2), bias = random_weights(kN, 4);
    for (auto& v : s) v = std::fabs(v) + 0.1f;
    const TensorView bv = view1(bias.data(), DType::kFloat32, kN);
    for (int64_t M : kBatches) {
      std::vector<float> x = random_weights(M * K, 9 + M);
      IsaGuard guard;
      for (cpu::Isa isa : native_runs()) {
        const GemmBackend be = isa == cpu::Isa::kScalar ? GemmBackend::kReference : GemmBackend::kNative;
        if (be == GemmBackend::kNative) cpu::set_isa(isa);
        const Expect e = expected(x, t, s, bias, M, K, 3.0, kernel_lanes(isa, M));
        std::vector<float> out(M * kN, NAN);
        linear_binary(view2(x.data(), DType::kFloat32, M, K), view2(w.data(), DType::kUInt8, kN, rb),
                      view1(s.data(), DType::kFloat32, kN), &bv,
                      view2(out.data(), DType::kFloat32, M, kN), be);
        expect_close(out, e, cpu::isa_name(isa), K);
      }
    }
  }
}

TEST(Binary, TernaryLinearMatchesFloat64) {
  for (int64_t K : kKs) {
    const int64_t rb = (K + 3) / 4;
    std::vector<int> t;
    std::vector<uint8_t> w = random_trits(kN, K, 13 + K, t);
    std::vector<float> s = random_weights(kN, 6), bias = random_weights(kN, 8);
    for (auto& v : s) v = std::fabs(v) + 0.1f;
    const TensorView bv = view1(bias.data(), DType::kFloat32, kN);
    for (int64_t M : kBatches) {
      std::vector<float> x = random_weights(M * K, 19 + M);
      IsaGuard guard;
      for (cpu::Isa isa : native_runs()) {
        const GemmBackend be = isa == cpu::Isa::kScalar ? GemmBackend::kReference : GemmBackend::kNative;
        if (be == GemmBackend::kNative) cpu::set_isa(isa);
        const Expect e = expected(x, t, s, bias, M, K, 1.0, kernel_lanes(isa, M));
        std::vector<float> out(M * kN, NAN);
        linear_ternary(view2(x.data(), DType::kFloat32, M, K), view2(w.data(), DType::kUInt8, kN, rb),
                       view1(s.data(), DType::kFloat32, kN), &bv,
                       view2(out.data(), DType::kFloat32, M, kN), be);
        expect_close(out, e, cpu::isa_name(isa), K);
      }
    }
  }
}

// The XNOR linear's float step is shared by every path and its dots are exact, so the
// outputs agree bit for bit; they equal dot * a_scale * w_scale + bias computed here.
TEST(Binary, XnorLinearIsExact) {
  for (int64_t K : kKs) {
    const int64_t rb = (K + 7) / 8;
    std::vector<uint8_t> w = random_bytes(kN * rb, 21 + K);
    std::vector<float> s = random_weights(kN, 3), bias = random_weights(kN, 5);
    for (auto& v : s) v = std::fabs(v) + 0.1f;
    const TensorView bv = view1(bias.data(), DType::kFloat32, kN);
    for (int64_t M : {1, 3, 4, 9, 17}) {
      std::vector<float> x = random_weights(M * K, 23 + M);
      std::vector<float> want(M * kN);
      for (int64_t m = 0; m < M; ++m) {
        double absx = 0;
        for (int64_t k = 0; k < K; ++k) absx += std::fabs(x[m * K + k]);
        const float a_scale = static_cast<float>(absx / K);
        for (int64_t n = 0; n < kN; ++n) {
          int32_t dot = 0;
          for (int64_t k = 0; k < K; ++k) dot += (x[m * K + k] >= 0 ? 1 : -1) * sign_at(w, rb, n, k);
          want[m * kN + n] = static_cast<float>(dot) * a_scale * s[n] + bias[n];
        }
      }
      IsaGuard guard;
      for (cpu::Isa isa : native_runs()) {
        cpu::set_isa(isa);
        for (GemmBackend be : {GemmBackend::kReference, GemmBackend::kNative, GemmBackend::kAuto}) {
          if (be == GemmBackend::kNative && isa == cpu::Isa::kScalar) continue;
          std::vector<float> out(M * kN, NAN);
          linear_xnor(view2(x.data(), DType::kFloat32, M, K), view2(w.data(), DType::kUInt8, kN, rb),
                      view1(s.data(), DType::kFloat32, kN), &bv, view2(out.data(), DType::kFloat32, M, kN),
                      be);
          ASSERT_EQ(out, want) << "K=" << K << " M=" << M << " backend=" << static_cast<int>(be) << " "
                               << cpu::isa_name(isa);
        }
      }
    }
  }
}

TEST(Binary, BadArgumentsRaise) {
  const int64_t M = 2, K = 20, N = 3;
  std::vector<float> x(M * K, 1.0f), s(N, 1.0f), out(M * N);
  std::vector<uint8_t> w(N * 4);
  const TensorView xv = view2(x.data(), DType::kFloat32, M, K), sv = view1(s.data(), DType::kFloat32, N),
                   ov = view2(out.data(), DType::kFloat32, M, N);
  // 20 binary weights need 3 bytes per row, not 4
  EXPECT_THROW(linear_binary(xv, view2(w.data(), DType::kUInt8, N, 4), sv, nullptr, ov, GemmBackend::kAuto),
               ValueError);
  EXPECT_THROW(linear_ternary(xv, view2(w.data(), DType::kUInt8, N, 3), sv, nullptr, ov, GemmBackend::kAuto),
               ValueError);
  EXPECT_THROW(linear_binary(xv, view2(w.data(), DType::kUInt8, N, 3), sv, nullptr, ov, GemmBackend::kOneDNN),
               ValueError);
  EXPECT_THROW(linear_xnor(xv, view2(w.data(), DType::kInt8, N, 3), sv, nullptr, ov, GemmBackend::kAuto),
               TypeError);
  std::vector<float> s2(N + 1);
  EXPECT_THROW(linear_binary(xv, view2(w.data(), DType::kUInt8, N, 3), view1(s2.data(), DType::kFloat32, N + 1),
                             nullptr, ov, GemmBackend::kAuto),
               ValueError);
  if (!vector_isas().empty()) {  // forcing the scalar ISA leaves no native kernel
    const cpu::Isa saved = cpu::active_isa();
    cpu::set_isa(cpu::Isa::kScalar);
    EXPECT_THROW(linear_binary(xv, view2(w.data(), DType::kUInt8, N, 3), sv, nullptr, ov, GemmBackend::kNative),
                 ValueError);
    cpu::set_isa(saved);
  }
}

}  // namespace
}  // namespace tensorslim
