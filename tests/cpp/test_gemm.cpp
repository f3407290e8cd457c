// Weight-only linear: the scalar reference against a float64 product, and the native
// (AVX-512) and oneDNN paths against the reference.
#include <gtest/gtest.h>

#include <cmath>

#include "half.h"
#include "onednn_usable.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::QuantizedWeight;
using testing::quantized_weight;
using testing::random_weights;
using testing::view1;
using testing::view2;

// Max |got - want| relative to the largest |want|.
double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num = std::max(num, std::fabs(got[i] - want[i]));
    den = std::max(den, std::fabs(want[i]));
  }
  return num / den;
}

TEST(LinearWeightOnly, EveryBackendMatchesFloat64) {
  const int64_t N = 48;
  for (int fi = 0; fi < kNumFormats; ++fi) {
    const Format fmt = format_table()[fi].format;
    for (int64_t K : {256, 96}) {
      for (int64_t group : {K, int64_t{32}}) {
        QuantizedWeight w = quantized_weight(fmt, N, K, group, 11 + fi);
        std::vector<float> bias = random_weights(N, 5);
        for (int64_t M : {1, 3, 8, 17}) {
          std::vector<float> x = random_weights(M * K, 3);
          std::vector<double> want(M * N);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              double acc = bias[n];
              for (int64_t k = 0; k < K; ++k) acc += (double)x[m * K + k] * w.deq[n * K + k];
              want[m * N + n] = acc;
            }
          for (GemmBackend be : {GemmBackend::kReference, GemmBackend::kNative, GemmBackend::kOneDNN,
                                 GemmBackend::kAuto}) {
            std::vector<float> out(M * N, NAN);
            const TensorView bv = view1(bias.data(), DType::kFloat32, N);
            auto run = [&] {
              linear_weight_only(view2(x.data(), DType::kFloat32, M, K), w.qv, w.sv,
                                 w.asym ? &w.zv : nullptr, &bv, fmt, group,
                                 view2(out.data(), DType::kFloat32, M, N), be);
            };
            // Past 8 rows the native path is the panel GEMM, which takes any K and group.
            const bool native_fits = cpu::active_isa() >= cpu::Isa::kAVX2 &&
                                     (M > 8 || format_info(fmt).bits == 8 || group >= K ||
                                      group % 32 == 0);
            if ((be == GemmBackend::kNative && !native_fits) ||
                (be == GemmBackend::kOneDNN && !cpu::onednn_usable())) {
              EXPECT_THROW(run(), ValueError);
              continue;
            }
            run();
            // fp32 accumulation over K terms of exactly dequantized weights.
            EXPECT_LT(rel_err(out, want), 1e-5)
                << format_info(fmt).name << " K=" << K << " g=" << group << " M=" << M
                << " backend=" << static_cast<int>(be);
          }
        }
      }
    }
  }
}

TEST(LinearWeightOnly, BFloat16Activations) {
  const int64_t M = 4, K = 256, N = 64;
  QuantizedWeight w = quantized_weight(Format::kInt4, N, K, 128, 3);
  std::vector<float> x = random_weights(M * K, 9);
  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = cpu::float_to_bf16(x[i]);
  std::vector<double> want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += (double)cpu::bf16_to_float(xb[m * K + k]) * w.deq[n * K + k];
      want[m * N + n] = acc;
    }
  for (GemmBackend be : {GemmBackend::kReference, GemmBackend::kOneDNN, GemmBackend::kAuto}) {
    if (be == GemmBackend::kOneDNN && !cpu::onednn_usable()) continue;  // a build without oneDNN
    std::vector<uint16_t> out(M * N);
    linear_weight_only(view2(xb.data(), DType::kBFloat16, M, K), w.qv, w.sv, nullptr, nullptr,
                       Format::kInt4, 128, view2(out.data(), DType::kBFloat16, M, N), be);
    std::vector<float> got(out.size());
    for (size_t i = 0; i < out.size(); ++i) got[i] = cpu::bf16_to_float(out[i]);
    // bf16 output keeps 8 significant bits; oneDNN may round the weights to bf16 too.
    EXPECT_LT(rel_err(got, want), 2e-2) << static_cast<int>(be);
  }
}

// An empty reduction (in_features 0) gives the bias on every backend; the native path used
// to divide by a zero group size (found by tests/fuzz/fuzz_linear_args).
TEST(LinearWeightOnly, EmptyReductionGivesTheBias) {
  std::vector<uint8_t> q(1);
  std::vector<float> x(1), s(3, 1.0f), bias = {0.5f, -1.0f, 2.0f};
  for (GemmBackend be : {GemmBackend::kAuto, GemmBackend::kReference, GemmBackend::kNative,
                         GemmBackend::kOneDNN}) {
    std::vector<float> out(6, NAN);
    const TensorView bv = view1(bias.data(), DType::kFloat32, 3);
    linear_weight_only(view2(x.data(), DType::kFloat32, 2, 0), view2(q.data(), DType::kInt8, 3, 0),
                       view2(s.data(), DType::kFloat32, 3, 1, 1), nullptr, &bv, Format::kInt8, 0,
                       view2(out.data(), DType::kFloat32, 2, 3), be);
    for (int i = 0; i < 6; ++i) EXPECT_EQ(out[i], bias[i % 3]) << static_cast<int>(be);
  }
}

TEST(LinearWeightOnly, RejectsMismatchedShapes) {
  QuantizedWeight w = quantized_weight(Format::kInt8, 16, 64, 64, 1);
  std::vector<float> x(2 * 32), out(2 * 16);
  EXPECT_THROW(linear_weight_only(view2(x.data(), DType::kFloat32, 2, 32), w.qv, w.sv, nullptr,
                                  nullptr, Format::kInt8, 64,
                                  view2(out.data(), DType::kFloat32, 2, 16), GemmBackend::kAuto),
               ValueError);
}

}  // namespace
}  // namespace tensorslim
