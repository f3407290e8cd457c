// Integer weight-only with the activations as three int8 pieces (src/cpu/activation_pieces.h):
// the split rebuilds x to float32 precision, the kernels match a float64 product of the
// exactly dequantized weight within the pieces' error, and inputs the pieces cannot hold (NaN,
// Inf, tiny rows) run the float kernels. Each ISA with a pieces kernel for the format (INT4:
// AVX2 and AVX-512 with VNNI; INT8: AVX-512 with VNNI).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>

#include "half.h"
#include "activation_pieces.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::Avx2VnniScope;
using testing::IsaScope;
using testing::QuantizedWeight;
using testing::quantized_weight;
using testing::random_weights;
using testing::view1;
using testing::view2;

// The ISAs this machine has a pieces kernel for, for fmt's width.
std::vector<cpu::Isa> piece_isas(Format fmt = Format::kInt4) {
  std::vector<cpu::Isa> out;
  if (cpu::best_isa() >= cpu::Isa::kAVX2 && format_info(fmt).bits == 4) out.push_back(cpu::Isa::kAVX2);
  if (cpu::best_isa() >= cpu::Isa::kAVX512 && cpu::cpu_has_avx512_vnni()) out.push_back(cpu::Isa::kAVX512);
  return out;
}

// Activation rows of very different sizes (1e-3 .. 1e3), each with an outlier 50x its typical
// value, so the per-row step and the pieces' reach are both exercised.
std::vector<float> make_x(int64_t M, int64_t K, uint32_t seed) {
  std::vector<float> x = random_weights(M * K, seed);
  for (int64_t m = 0; m < M; ++m) {
    const float size = std::pow(10.0f, static_cast<float>(m % 4) * 2.0f - 3.0f);
    for (int64_t k = 0; k < K; ++k) x[m * K + k] *= size;
    x[m * K + (7 * m + 3) % K] *= 50.0f;
  }
  return x;
}

// |got - want| against the pieces' error: s / (2 * 254^2) ~ 6.1e-8 max|x| per activation
// (2e-7 leaves room for rounding x / s), times sum |w|, plus float32 accumulation over
// products that are each exact in float64 (1e-6 of sum |w x|) and the output's own rounding.
void expect_close(const std::vector<float>& got, const std::vector<float>& x, const QuantizedWeight& w,
                  const std::vector<float>& bias, int64_t M, int64_t N, int64_t K,
                  const std::string& what) {
  for (int64_t m = 0; m < M; ++m) {
    double xmax = 0;
    for (int64_t k = 0; k < K; ++k) xmax = std::max(xmax, std::fabs(static_cast<double>(x[m * K + k])));
    for (int64_t n = 0; n < N; ++n) {
      double want = bias[n], sum_w = 0, sum_wx = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double wk = w.deq[n * K + k], xk = x[m * K + k];
        want += wk * xk;
        sum_w += std::fabs(wk);
        sum_wx += std::fabs(wk * xk);
      }
      const double bound = 2e-7 * xmax * sum_w + 1e-6 * sum_wx + 1.2e-7 * std::fabs(want) + 1e-30;
      ASSERT_LE(std::fabs(got[m * N + n] - want), bound) << what << " m=" << m << " n=" << n;
    }
  }
}

// The pieces rebuild x within 7e-8 max|x[m]|, each within [-127, 127], and the group sums
// are the sums of the rebuilt values.
void check_pieces(const cpu::ActivationPieces& a, const std::vector<float>& x, int64_t M, int64_t K,
                  int64_t gsize, bool even_odd, const std::string& what) {
  for (int64_t m = 0; m < M; ++m) {
    double xmax = 0;
    for (int64_t k = 0; k < K; ++k) xmax = std::max(xmax, std::fabs(static_cast<double>(x[m * K + k])));
    const double s = a.step[m];
    EXPECT_NEAR(s, xmax / 127, 1e-6 * xmax / 127);
    for (int64_t g = 0; g < K / gsize; ++g) {
      double group_sum = 0;
      for (int64_t k = g * gsize; k < (g + 1) * gsize; ++k) {
        // Block of 128: INT4 even k at (k % 128) / 2, odd k at 64 + (k % 128) / 2; INT8 in order.
        const int64_t block = k / cpu::kPieceBlock, in = k % cpu::kPieceBlock;
        const int64_t at = even_odd ? (in & 1) * 64 + in / 2 : in;
        const int8_t* q = a.q.data() + (m * K + block * cpu::kPieceBlock) * 3;
        double rebuilt = 0, weight = 1;
        for (int j = 0; j < 3; ++j, weight /= 254) {
          const int piece = q[j * cpu::kPieceBlock + at];
          ASSERT_GE(piece, -127);
          ASSERT_LE(piece, 127);
          rebuilt += piece * weight;
        }
        group_sum += rebuilt;
        EXPECT_LE(std::fabs(s * rebuilt - x[m * K + k]), 7e-8 * xmax) << what << " m=" << m << " k=" << k;
      }
      EXPECT_NEAR(a.group_sums[m * (K / gsize) + g], group_sum, 1e-6 * std::fabs(group_sum) + 1e-3) << what;
    }
  }
}

TEST(ActivationPieces, SplitRebuildsTheActivations) {
  const int64_t M = 3, K = 512;
  std::vector<float> x = make_x(M, K, 5);
  for (int64_t gsize : {256, 32})
  for (Format fmt : {Format::kInt4, Format::kInt8})
    for (cpu::Isa isa : piece_isas(fmt)) {
      IsaScope scope(isa);
      if (!cpu::pieces_kernel_takes(fmt, K, gsize)) continue;
      cpu::ActivationPieces a;
      ASSERT_TRUE(cpu::split_activation_pieces(view2(x.data(), DType::kFloat32, M, K), gsize, fmt, a));
      check_pieces(a, x, M, K, gsize, format_info(fmt).bits == 4,
                   std::string(cpu::isa_name(isa)) + " " + format_info(fmt).name + " g" + std::to_string(gsize));
    }
}

// On AVX2 the kernel also runs with vpdpbusd toggled (where the CPU has a form of it) and must
// give the same bits: both sum the same integers exactly.
TEST(ActivationPieces, MatchFloat64OnEveryShapeTheyTake) {
  const int64_t N = 37;  // four- and two-row steps plus single-row tails
  struct Shape { int64_t K, group; };
  for (Format fmt : {Format::kInt4, Format::kUInt4, Format::kInt8, Format::kUInt8})
  for (cpu::Isa isa : piece_isas(fmt))
    for (Shape sh : {Shape{128, 128}, Shape{384, 128}, Shape{2048, 128}, Shape{2048, 256}, Shape{2304, 2304},
                     Shape{384, 32}, Shape{1024, 64}})
      for (int64_t M : {1, 2, 3, 4, 5, 8, 13, 32}) {
        const int64_t K = sh.K, gsize = std::min(sh.group, K);
        IsaScope scope(isa);
        if (!cpu::pieces_kernel_takes(fmt, K, gsize)) continue;
        const std::string what = std::string(cpu::isa_name(isa)) + " " + format_info(fmt).name + " K=" + std::to_string(K) +
                                 " g=" + std::to_string(sh.group) + " M=" + std::to_string(M);
        QuantizedWeight w = quantized_weight(fmt, N, K, sh.group, 17 + static_cast<uint32_t>(K + M));
        std::vector<float> x = make_x(M, K, 3 + static_cast<uint32_t>(M));
        std::vector<float> bias = random_weights(N, 9);
        const TensorView xv = view2(x.data(), DType::kFloat32, M, K), bv = view1(bias.data(), DType::kFloat32, N);
        const TensorView* zp = w.zero_points();
        // The kernel itself, whether or not linear_weight_only would pick it at this M and K.
        cpu::ActivationPieces a;
        ASSERT_TRUE(cpu::split_activation_pieces(xv, gsize, fmt, a)) << what;
        std::vector<float> got(M * N, NAN);
        const TensorView ov = view2(got.data(), DType::kFloat32, M, N);
        const cpu::WeightOnlyProblem p{w.qv, w.sv, zp, &bv, ov, K, gsize, K / gsize, nullptr};
        cpu::linear_pieces(p, a, fmt, M);
        expect_close(got, x, w, bias, M, N, K, what + " (kernel)");
        if (isa == cpu::Isa::kAVX2 && cpu::avx2_vnni_available()) {  // its integer sums on vpdpbusd: the same bits
          const bool was = cpu::avx2_vnni() != cpu::AvxVnni::kNone;
          Avx2VnniScope dot(!was);
          std::vector<float> other(M * N, NAN);
          cpu::linear_pieces({w.qv, w.sv, zp, &bv, view2(other.data(), DType::kFloat32, M, N), K, gsize, K / gsize, nullptr},
                             a, fmt, M);
          EXPECT_EQ(other, got) << what << " vpdpbusd " << (was ? "off" : "on");
        }
        // And through linear_weight_only, both with the pieces and with the float kernels (the
        // panel GEMM or oneDNN past 8 rows); "auto" takes the pieces wherever native does.
        const std::vector<bool> vnni_settings =
            isa == cpu::Isa::kAVX2 ? testing::avx2_vnni_settings() : std::vector<bool>{false};
        for (bool pieces : {true, false})
          for (GemmBackend backend : {GemmBackend::kNative, GemmBackend::kAuto})
          for (bool vnni : vnni_settings) {  // AVX2 with vpdpbusd takes the pieces at 2-8 rows too
            std::optional<Avx2VnniScope> dot;
            if (isa == cpu::Isa::kAVX2) dot.emplace(vnni);
            cpu::set_activation_pieces_enabled(pieces);
            std::vector<float> out(M * N, NAN);
            linear_weight_only(xv, w.qv, w.sv, zp, &bv, fmt, sh.group,
                               view2(out.data(), DType::kFloat32, M, N), backend);
            const std::string how = (pieces ? " (pieces, " : " (float, ") +
                                    std::string(backend == GemmBackend::kAuto ? "auto" : "native") +
                                    (vnni ? ", vpdpbusd)" : ")");
            expect_close(out, x, w, bias, M, N, K, what + how);
            if (pieces && cpu::pieces_fit(fmt, M, K, gsize)) EXPECT_EQ(out, got) << what + how;
          }
        cpu::set_activation_pieces_enabled(true);
      }
}

TEST(ActivationPieces, BFloat16Activations) {
  const int64_t M = 1, K = 1024, N = 20;
  QuantizedWeight w = quantized_weight(Format::kInt4, N, K, 128, 4);
  std::vector<float> x = make_x(M, K, 8);
  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    xb[i] = cpu::float_to_bf16(x[i]);
    x[i] = cpu::bf16_to_float(xb[i]);
  }
  for (cpu::Isa isa : piece_isas()) {
    IsaScope scope(isa);
    cpu::ActivationPieces a;
    ASSERT_TRUE(cpu::split_activation_pieces(view2(xb.data(), DType::kBFloat16, M, K), 128, Format::kInt4, a));
    std::vector<float> got(M * N), bias(N, 0.0f);
    const TensorView ov = view2(got.data(), DType::kFloat32, M, N);
    const cpu::WeightOnlyProblem p{w.qv, w.sv, nullptr, nullptr, ov, K, 128, K / 128, nullptr};
    cpu::linear_pieces(p, a, Format::kInt4, M);
    expect_close(got, x, w, bias, M, N, K, std::string(cpu::isa_name(isa)) + " bf16 x");
  }
}

// A short last group of whole blocks (K a multiple of 128, not of the group) is not the
// pieces' to take: through linear_weight_only it runs the float kernels, within the float64
// bound, on every path and at the rows where the pieces would have run (it was summed without
// that last group: 30-67% errors).
TEST(ActivationPieces, ShortLastGroupRunsTheFloatKernels) {
  const int64_t N = 9;
  struct Shape { int64_t K, group; };
  for (Format fmt : {Format::kInt4, Format::kUInt4, Format::kInt8, Format::kUInt8})
    for (cpu::Isa isa : piece_isas(fmt))
      for (Shape sh : {Shape{4224, 4096}, Shape{2560, 1024}, Shape{640, 512}})
        for (int64_t M : {1, 2, 4}) {
          IsaScope scope(isa);
          const std::string what = std::string(cpu::isa_name(isa)) + " " + format_info(fmt).name + " K=" +
                                   std::to_string(sh.K) + " g=" + std::to_string(sh.group) + " M=" + std::to_string(M);
          EXPECT_FALSE(cpu::pieces_kernel_takes(fmt, sh.K, sh.group)) << what;
          EXPECT_FALSE(cpu::pieces_fit(fmt, M, sh.K, sh.group)) << what;
          QuantizedWeight w = quantized_weight(fmt, N, sh.K, sh.group, 41 + static_cast<uint32_t>(sh.K + M));
          std::vector<float> x = make_x(M, sh.K, 5 + static_cast<uint32_t>(M)), bias = random_weights(N, 3);
          std::vector<float> out(M * N, NAN);
          linear_weight_only(view2(x.data(), DType::kFloat32, M, sh.K), w.qv, w.sv, w.zero_points(),
                             nullptr, fmt, sh.group, view2(out.data(), DType::kFloat32, M, N), GemmBackend::kAuto);
          std::fill(bias.begin(), bias.end(), 0.0f);
          expect_close(out, x, w, bias, M, N, sh.K, what);
        }
}

TEST(ActivationPieces, InputsThePiecesCannotHoldRunTheFloatKernels) {
  const int64_t M = 1, K = 256, N = 8;
  QuantizedWeight w = quantized_weight(Format::kInt4, N, K, 128, 6);
  std::vector<float> bias = random_weights(N, 2);
  const TensorView bv = view1(bias.data(), DType::kFloat32, N);
  auto run = [&](std::vector<float>& x, bool with_bias = true) {
    std::vector<float> out(M * N, 12345.0f);
    linear_weight_only(view2(x.data(), DType::kFloat32, M, K), w.qv, w.sv, nullptr, with_bias ? &bv : nullptr,
                       Format::kInt4, 128,
                       view2(out.data(), DType::kFloat32, M, N), GemmBackend::kNative);
    return out;
  };
  for (cpu::Isa isa : piece_isas()) {
    IsaScope scope(isa);
    const std::string what = cpu::isa_name(isa);
    cpu::ActivationPieces a;
    std::vector<float> x = random_weights(K, 1);
    x[40] = NAN;
    EXPECT_FALSE(cpu::split_activation_pieces(view2(x.data(), DType::kFloat32, M, K), 128, Format::kInt4, a));
    for (float v : run(x)) EXPECT_TRUE(std::isnan(v));
    x[40] = INFINITY;
    EXPECT_FALSE(cpu::split_activation_pieces(view2(x.data(), DType::kFloat32, M, K), 128, Format::kInt4, a));
    for (float v : run(x)) EXPECT_FALSE(std::isfinite(v));
    // A tiny row (its step would be subnormal) keeps the float kernels' precision.
    x = random_weights(K, 1);
    for (float& v : x) v *= 1e-35f;
    EXPECT_FALSE(cpu::split_activation_pieces(view2(x.data(), DType::kFloat32, M, K), 128, Format::kInt4, a));
    std::vector<float> got = run(x, false);
    for (int64_t n = 0; n < N; ++n) {
      double want = 0;
      for (int64_t k = 0; k < K; ++k) want += static_cast<double>(w.deq[n * K + k]) * x[k];
      EXPECT_NEAR(got[n], want, 1e-5 * std::fabs(want)) << what << " " << n;
    }
    // All zeros: the pieces are 0 and the output is the bias exactly.
    std::fill(x.begin(), x.end(), 0.0f);
    EXPECT_TRUE(cpu::split_activation_pieces(view2(x.data(), DType::kFloat32, M, K), 128, Format::kInt4, a));
    EXPECT_EQ(run(x), bias);
    // Large rows stay finite where the product is.
    x = random_weights(K, 3);
    for (float& v : x) v *= 1e36f;
    expect_close(run(x), x, w, bias, M, N, K, what + " x ~ 1e36");
  }
}

}  // namespace
}  // namespace tensorslim
