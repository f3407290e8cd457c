// The decode-once panel GEMM behind linear_weight_only's native path past the GEMV's rows: every ISA
// against a float64 product of the exactly dequantized weight, on shapes that exercise both
// micro-kernels (rows-dot up to 64 rows and K <= 2048, broadcast past them), partial
// micro-tiles (M % 6, M % 4), partial panels and weight-row blocks (N % 3, N % 4, N % 16,
// N % 32, N > 64), K tails (K % 8, K % 16), short last groups, groups that straddle the K
// blocks decoded at a time, and strided activation rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "half.h"
#include "int4_codes.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::IsaScope;
using testing::machine_isas;
using testing::QuantizedWeight;
using testing::quantized_weight;
using testing::random_weights;
using testing::view1;
using testing::view2;

// out rows of M x N against sum_k x * deq in float64; returns max error / max |want|.
double panel_error(const QuantizedWeight& w, Format fmt, int64_t group, int64_t M, int64_t N, int64_t K,
                   int64_t ldx, bool bf16_out) {
  const std::vector<float> x = random_weights(M * ldx, 3);
  const std::vector<float> bias = random_weights(N, 5);
  std::vector<float> got(M * N, NAN);
  std::vector<uint16_t> got16(M * N);
  const TensorView bv = view1(const_cast<float*>(bias.data()), DType::kFloat32, N);
  if (bf16_out) {
    std::vector<uint16_t> xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = cpu::float_to_bf16(x[i]);
    linear_weight_only(view2(xb.data(), DType::kBFloat16, M, K, ldx), w.qv, w.sv,
                       w.asym ? &w.zv : nullptr, &bv, fmt, group,
                       view2(got16.data(), DType::kBFloat16, M, N), GemmBackend::kNative);
    for (size_t i = 0; i < got.size(); ++i) got[i] = cpu::bf16_to_float(got16[i]);
  } else {
    linear_weight_only(view2(const_cast<float*>(x.data()), DType::kFloat32, M, K, ldx), w.qv,
                       w.sv, w.asym ? &w.zv : nullptr, &bv, fmt, group,
                       view2(got.data(), DType::kFloat32, M, N), GemmBackend::kNative);
  }
  double num = 0, den = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double want = bias[n];
      for (int64_t k = 0; k < K; ++k) {
        const float xv = bf16_out ? cpu::bf16_to_float(cpu::float_to_bf16(x[m * ldx + k])) : x[m * ldx + k];
        want += static_cast<double>(xv) * w.deq[n * K + k];
      }
      num = std::max(num, std::fabs(got[m * N + n] - want));
      den = std::max(den, std::fabs(want));
    }
  return num / den;
}

TEST(PanelGemm, EveryIsaMatchesFloat64) {
  for (cpu::Isa isa : machine_isas()) {
    if (isa == cpu::Isa::kScalar) continue;
    IsaScope scope(isa);
    for (Format fmt : {Format::kInt8, Format::kUInt8, Format::kInt4, Format::kUInt4}) {
      struct Shape { int64_t K, group; };
      for (Shape s : {Shape{384, 128}, Shape{384, 384}, Shape{100, 100}, Shape{96, 32}, Shape{2, 2},
                       Shape{33, 33}, Shape{2050, 128},
                       Shape{576, 128}, Shape{100, 32},  // these two end in a short group
                       Shape{576, 96}}) {  // groups across the K blocks' edges (128 / 256 k)
        for (int64_t N : {48, 37, 1, 70}) {
          const QuantizedWeight w = quantized_weight(fmt, N, s.K, s.group, 7);
          // 5 and 7: 4-bit on AVX2 (gemv_max_rows); tiles of 5 to 12 rows (AVX-512's 12-row tiles:
          // 16 as 8 + 8, 24 as 12 + 12, 65 as 11 x 5 + 10)
          for (int64_t M : {5, 7, 9, 12, 13, 16, 24, 31, 64, 65}) {
            EXPECT_LT(panel_error(w, fmt, s.group, M, N, s.K, s.K, false), 1e-5)
                << cpu::isa_name(isa) << " " << format_info(fmt).name << " K=" << s.K
                << " g=" << s.group << " N=" << N << " M=" << M;
          }
        }
      }
    }
  }
}

TEST(PanelGemm, StridedRowsAndBFloat16) {
  for (cpu::Isa isa : machine_isas()) {
    if (isa == cpu::Isa::kScalar) continue;
    IsaScope scope(isa);
    const QuantizedWeight w = quantized_weight(Format::kInt4, 40, 256, 64, 7);
    EXPECT_LT(panel_error(w, Format::kInt4, 64, 11, 40, 256, 300, false), 1e-5) << cpu::isa_name(isa);
    // bf16 output keeps 8 significant bits.
    EXPECT_LT(panel_error(w, Format::kInt4, 64, 11, 40, 256, 256, true), 1e-2) << cpu::isa_name(isa);
  }
}

// From 16 rows bf16 activations take the AVX512-BF16 micro-tiles where the CPU has them
// (the weights rounded to bf16: 8 significant bits, as the output), else the fp32 ones: odd K
// (a last value without a pair in each block's tail), strided rows, partial panels, INT8 / INT4.
TEST(PanelGemm, BFloat16ActivationsPastSixteenRows) {
  for (cpu::Isa isa : machine_isas()) {
    if (isa == cpu::Isa::kScalar) continue;
    IsaScope scope(isa);
    for (Format fmt : {Format::kInt4, Format::kInt8, Format::kUInt4}) {
      struct Shape { int64_t K, group, ldx; };
      for (Shape sh : {Shape{257, 257, 257}, Shape{384, 128, 400}, Shape{1031, 1031, 1031}}) {
        const QuantizedWeight w = quantized_weight(fmt, 70, sh.K, sh.group, 5);
        for (int64_t M : {16, 37, 70})
          EXPECT_LT(panel_error(w, fmt, sh.group, M, 70, sh.K, sh.ldx, true), 1e-2)
              << cpu::isa_name(isa) << " " << format_info(fmt).name << " K=" << sh.K << " M=" << M;
      }
    }
  }
}

// The INT4 panel decoders write the packed layout straight from the codes: every value bit
// for bit the reference's (code - zero point) * scale, over K blocks that start and end inside
// groups, K tails (K % 8), partial panels and both formats.
TEST(PanelGemm, Int4PanelDecodeIsTheReference) {
  for (cpu::Isa isa : machine_isas()) {
    if (isa == cpu::Isa::kScalar) continue;
    const bool avx512 = isa == cpu::Isa::kAVX512;
    const auto decode = avx512 ? cpu::decode_int4_panel_avx512 : cpu::decode_int4_panel_avx2;
    const int64_t NR = avx512 ? 32 : 16, N = 37;
    for (Format fmt : {Format::kInt4, Format::kUInt4}) {
      struct Shape { int64_t K, group; };
      for (Shape sh : {Shape{300, 32}, Shape{300, 64}, Shape{300, 300}, Shape{1024, 128}, Shape{17, 17}}) {
        const QuantizedWeight w = quantized_weight(fmt, N, sh.K, sh.group, 11);
        const int64_t groups = (sh.K + sh.group - 1) / sh.group;
        const cpu::Int4PanelRows rows{w.q.data(), (sh.K + 1) / 2, w.scales.data(), groups,
                                      w.asym ? w.zps.data() : nullptr, groups, sh.group, sh.K};
        for (int64_t n0 = 0; n0 < N; n0 += NR)
          for (int64_t k0 = 0; k0 < sh.K; k0 += 128)
            for (int64_t kc : {std::min<int64_t>(128, sh.K - k0), sh.K - k0}) {
              const int64_t nr = std::min(NR, N - n0);
              std::vector<float> packed(kc * NR, NAN);
              decode(rows, n0, nr, k0, kc, packed.data());
              int64_t wrong = 0, not_finite = 0;
              for (int64_t k = 0; k < kc; ++k)
                for (int64_t j = 0; j < NR; ++j) {
                  const float got = packed[k * NR + j];
                  if (j >= nr) {
                    not_finite += !std::isfinite(got);
                    continue;
                  }
                  const float want = w.deq[(n0 + j) * sh.K + k0 + k];
                  wrong += std::memcmp(&got, &want, sizeof(float)) != 0;
                }
              EXPECT_EQ(wrong, 0) << cpu::isa_name(isa) << " " << format_info(fmt).name << " K=" << sh.K
                                  << " g=" << sh.group << " n0=" << n0 << " k0=" << k0 << " kc=" << kc;
              EXPECT_EQ(not_finite, 0) << cpu::isa_name(isa) << " columns past the panel's rows";
            }
      }
    }
  }
}

}  // namespace
}  // namespace tensorslim
