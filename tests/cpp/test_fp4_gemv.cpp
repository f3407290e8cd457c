// The E2M1 GEMV (src/cpu/fp4_gemv.h): both ISAs' kernels called directly against float64
// over the reference-decoded weight, the activations' re-layout and its range check, which
// weights it takes, and linear_lowbit leaving it for activations it cannot take; and on
// AVX-512 VNNI the integer kernel on the activations as three int8 pieces.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "activation_pieces.h"
#include "fp4_gemv.h"
#include "tensorslim/formats.h"
#include "tensorslim/lowbit.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::IsaScope;
using testing::random_weights;
using testing::view1;
using testing::view2;

// A weight quantized by the scalar reference, and its reference-decoded values.
struct Fp4Weight {
  const FormatInfo* info;
  int64_t N, K;
  std::vector<uint8_t> q, scales;
  std::vector<float> ts, ref;
  cpu::LowbitWeight view() const {
    const int64_t groups = K / info->block_size;
    return {info, q.data(), packed_row_bytes(*info, K), scales.data(), nullptr, ts[0], groups,
            info->block_size, groups};
  }
};

Fp4Weight make_weight(Format fmt, int64_t N, int64_t K, uint32_t seed, float magnitude = 1.0f) {
  IsaScope scalar(cpu::Isa::kScalar);
  Fp4Weight w{&format_info(fmt), N, K, {}, {}, {1.0f}, {}};
  std::vector<float> x = random_weights(N * K, seed);
  for (float& v : x) v *= magnitude;
  const int64_t groups = K / w.info->block_size, bytes = packed_row_bytes(*w.info, K);
  w.q.resize(N * bytes);
  w.scales.resize(N * groups);
  w.ref.resize(N * K);
  const TensorView qv = view2(w.q.data(), DType::kUInt8, N, bytes), sv = view2(w.scales.data(), DType::kUInt8, N, groups);
  const TensorView tv = view1(w.ts.data(), DType::kFloat32, 1);
  const TensorView* tvp = w.info->has_tensor_scale ? &tv : nullptr;
  quantize_lowbit(view2(x.data(), DType::kFloat32, N, K), fmt, w.info->block_size, qv, sv, nullptr, tvp);
  dequantize_lowbit(qv, sv, nullptr, tvp, fmt, w.info->block_size, view2(w.ref.data(), DType::kFloat32, N, K));
  return w;
}

struct Kernel {
  const char* name;
  int lanes;
  void (*fn)(const cpu::Fp4Acts&, const cpu::LowbitWeight&, const float*, float*, int64_t, int64_t, int64_t);
};

std::vector<Kernel> kernels() {
  std::vector<Kernel> k;
  if (cpu::best_isa() >= cpu::Isa::kAVX2) k.push_back({"avx2", 8, cpu::linear_fp4_avx2});
  if (cpu::best_isa() >= cpu::Isa::kAVX512) k.push_back({"avx512", 16, cpu::linear_fp4_avx512});
  return k;
}

TEST(Fp4Gemv, KernelsMatchFloat64OverTheReferenceWeight) {
  if (kernels().empty()) GTEST_SKIP() << "no AVX2";
  for (const Kernel& kern : kernels())
    for (Format fmt : {Format::kNVFP4, Format::kMXFP4})
      for (int64_t K : {32, 96, 512})
        for (int64_t N : {1, 3, 4, 6, 9})
          for (int64_t M : {1, 2, 3, 4, 5, 9}) {
            const Fp4Weight w = make_weight(fmt, N, K, 7 + static_cast<uint32_t>(K + N));
            ASSERT_TRUE(cpu::fp4_gemv_fits(*w.info, K, w.info->block_size, kern.lanes));
            const std::vector<float> x = random_weights(M * K, 11 + static_cast<uint32_t>(M)),
                                     bias = random_weights(N, 3);
            std::vector<float> packed(M * K);
            ASSERT_TRUE(cpu::pack_fp4_activations(x.data(), K, M, K, kern.lanes, packed.data()));
            for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
              // Rows [1, N) only when N > 1: the call writes its rows and nothing else.
              const int64_t n0 = N > 1 ? 1 : 0;
              std::vector<float> out(M * N, -7.0f);
              kern.fn({packed.data(), M, K}, w.view(), b, out.data(), N, n0, N);
              for (int64_t m = 0; m < M; ++m)
                for (int64_t n = 0; n < N; ++n) {
                  if (n < n0) {
                    EXPECT_EQ(out[m * N + n], -7.0f);
                    continue;
                  }
                  double want = b ? b[n] : 0.0, mag = std::fabs(want);
                  for (int64_t k = 0; k < K; ++k) {
                    want += double(x[m * K + k]) * w.ref[n * K + k];
                    mag += std::fabs(double(x[m * K + k]) * w.ref[n * K + k]);
                  }
                  EXPECT_NEAR(out[m * N + n], want, 1e-6 * mag + 1e-30)
                      << kern.name << " " << w.info->name << " K " << K << " N " << N << " M " << M << " n " << n;
                }
            }
          }
}

// Scale bytes the quantizer does not write (E4M3 NaN 0x7F / 0xFF, negative E4M3, E8M0 0 =
// 2^-127 and 255 = NaN) are decoded as the reference decodes them (a row whose weights hold
// a NaN gives NaN), by the vector scale decode (16 / 8 at a time) and its scalar tail alike.
TEST(Fp4Gemv, KernelsDecodeEveryScaleByte) {
  if (kernels().empty()) GTEST_SKIP() << "no AVX2";
  const int64_t N = 8, M = 2;
  for (const Kernel& kern : kernels())
    for (Format fmt : {Format::kNVFP4, Format::kMXFP4}) {
      const int64_t K = fmt == Format::kNVFP4 ? 16 * 36 : 32 * 36;  // 36 groups: 2 x 16 + 4 (tail)
      Fp4Weight w = make_weight(fmt, N, K, 21);
      const int64_t groups = K / w.info->block_size;
      for (int64_t i = 0; i < N * groups; ++i) {
        const int b = static_cast<int>(i * 7 % 256);
        // E8M0 above 2^12 would overflow 6 * scale * x in the reference too; keep 255 (NaN).
        w.scales[i] = static_cast<uint8_t>(fmt == Format::kMXFP4 && b > 139 && b != 255 ? b % 140 : b);
      }
      w.scales[0] = fmt == Format::kMXFP4 ? 0 : 0x80;  // 2^-127, or E4M3 -0
      if (fmt == Format::kMXFP4)  // a whole row of 2^-127: its products are ~1e-37, compared below to 1e-45
        for (int64_t g = 0; g < groups; ++g) w.scales[(N - 1) * groups + g] = 0;
      const TensorView tv = view1(w.ts.data(), DType::kFloat32, 1);
      const int64_t bytes = packed_row_bytes(*w.info, K);
      {
        IsaScope scalar(cpu::Isa::kScalar);
        dequantize_lowbit(view2(w.q.data(), DType::kUInt8, N, bytes), view2(w.scales.data(), DType::kUInt8, N, groups),
                          nullptr, w.info->has_tensor_scale ? &tv : nullptr, fmt, w.info->block_size,
                          view2(w.ref.data(), DType::kFloat32, N, K));
      }
      const std::vector<float> x = random_weights(M * K, 8);
      std::vector<float> packed(M * K), out(M * N);
      ASSERT_TRUE(cpu::pack_fp4_activations(x.data(), K, M, K, kern.lanes, packed.data()));
      kern.fn({packed.data(), M, K}, w.view(), nullptr, out.data(), N, 0, N);
      int nan_rows = 0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double want = 0, mag = 0;
          for (int64_t k = 0; k < K; ++k) {
            want += double(x[m * K + k]) * w.ref[n * K + k];
            mag += std::fabs(double(x[m * K + k]) * w.ref[n * K + k]);
          }
          const float got = out[m * N + n];
          if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(got)) << kern.name << " " << w.info->name << " n " << n;
            ++nan_rows;
            continue;
          }
          EXPECT_NEAR(got, want, 1e-6 * mag + 1e-45) << kern.name << " " << w.info->name << " m " << m << " n " << n;
        }
      EXPECT_GT(nan_rows, 0) << "the sweep holds NaN scales";
    }
}

TEST(Fp4Gemv, PackingInterleavesBlocksAndRefusesOutOfRangeValues) {
  for (int lanes : {8, 16}) {
    const int64_t M = 2, K = 4 * lanes;
    std::vector<float> x(M * (K + 3)), out(M * K);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
    ASSERT_TRUE(cpu::pack_fp4_activations(x.data(), K + 3, M, K, lanes, out.data()));  // row stride K + 3
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < K; b += 2 * lanes)
        for (int j = 0; j < lanes; ++j) {
          EXPECT_EQ(out[m * K + b + j], x[m * (K + 3) + b + 2 * j]);
          EXPECT_EQ(out[m * K + b + lanes + j], x[m * (K + 3) + b + 2 * j + 1]);
        }
    for (float bad : {0x1p101f, -0x1p101f, std::numeric_limits<float>::infinity(),
                      std::numeric_limits<float>::quiet_NaN()}) {
      std::vector<float> y(M * K, 1.0f);
      y[M * K - 1] = bad;
      EXPECT_FALSE(cpu::pack_fp4_activations(y.data(), K, M, K, lanes, out.data())) << bad;
    }
    std::vector<float> edge(M * K, -cpu::kFp4MaxActivation);
    EXPECT_TRUE(cpu::pack_fp4_activations(edge.data(), K, M, K, lanes, out.data()));
  }
}

TEST(Fp4Gemv, TakesE2M1FormatsInWholeBlocksOnly) {
  const FormatInfo &nv = format_info(Format::kNVFP4), &mx = format_info(Format::kMXFP4);
  EXPECT_TRUE(cpu::fp4_gemv_fits(nv, 64, 16, 16));
  EXPECT_TRUE(cpu::fp4_gemv_fits(nv, 16, 16, 8));
  EXPECT_FALSE(cpu::fp4_gemv_fits(nv, 16, 16, 16));  // half a 32-value step
  EXPECT_FALSE(cpu::fp4_gemv_fits(nv, 40, 16, 8));
  EXPECT_FALSE(cpu::fp4_gemv_fits(nv, 64, 32, 16));  // not the format's block
  EXPECT_TRUE(cpu::fp4_gemv_fits(mx, 4096, 32, 16));
  EXPECT_FALSE(cpu::fp4_gemv_fits(mx, 4096, 32, 4));
  for (Format f : {Format::kFP8E4M3, Format::kInt4, Format::kTernary, Format::kInt3})
    EXPECT_FALSE(cpu::fp4_gemv_fits(format_info(f), 4096, 32, 16)) << format_info(f).name;
}

// Activations whose product with an unscaled code value overflows (1e38 * 6) while the
// reference's x * (value * scale) does not: linear_lowbit leaves the E2M1 kernel for the
// scaled-table one and stays finite and right; the E2M1 kernel on them would not.
TEST(Fp4Gemv, LinearLowbitKeepsOutOfRangeActivationsOffTheKernel) {
  if (kernels().empty()) GTEST_SKIP() << "no AVX2";
  const int64_t M = 1, N = 5, K = 64;
  for (const Kernel& kern : kernels()) {
    IsaScope isa(kern.lanes == 16 ? cpu::Isa::kAVX512 : cpu::Isa::kAVX2);
    for (Format fmt : {Format::kNVFP4, Format::kMXFP4}) {
      const Fp4Weight w = make_weight(fmt, N, K, 5, 1e-6f);
      std::vector<float> x = random_weights(M * K, 6), out(M * N);
      for (float& v : x) v = v < 0 ? -1e38f : 1e38f;
      const FormatInfo& f = *w.info;
      std::vector<uint8_t> q = w.q, s = w.scales;
      std::vector<float> ts = w.ts;
      const int64_t groups = K / f.block_size;
      const TensorView tv = view1(ts.data(), DType::kFloat32, 1);
      linear_lowbit(view2(x.data(), DType::kFloat32, M, K), view2(q.data(), DType::kUInt8, N, w.q.size() / N),
                    view2(s.data(), DType::kUInt8, N, groups), nullptr, f.has_tensor_scale ? &tv : nullptr, nullptr,
                    fmt, f.block_size, view2(out.data(), DType::kFloat32, M, N), nullptr, GemmBackend::kNative);
      for (int64_t n = 0; n < N; ++n) {
        double want = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          want += double(x[k]) * w.ref[n * K + k];
          mag += std::fabs(double(x[k]) * w.ref[n * K + k]);
        }
        ASSERT_LT(mag, 1e37) << "the reference products are finite";
        EXPECT_NEAR(out[n], want, 1e-6 * mag) << kern.name << " " << f.name << " n " << n;
      }
      // Packed regardless of the check, the E2M1 kernel's unscaled products overflow.
      std::vector<float> packed(M * K), raw(M * N);
      for (int64_t b = 0; b < K; b += 2 * kern.lanes)
        for (int j = 0; j < kern.lanes; ++j) {
          packed[b + j] = x[b + 2 * j];
          packed[b + kern.lanes + j] = x[b + 2 * j + 1];
        }
      kern.fn({packed.data(), M, K}, w.view(), nullptr, raw.data(), N, 0, N);
      bool overflowed = false;
      for (float v : raw) overflowed |= !std::isfinite(v);
      EXPECT_TRUE(overflowed) << kern.name << " " << f.name;
    }
  }
}

// ---- a few rows on AVX-512 VNNI: the activations as three int8 pieces (activation_pieces.h)

// The ISAs with an E2M1 pieces kernel here: AVX-512 with VNNI (an ISA list, as the other
// kernels' tests, for when AVX2 gets one).
std::vector<cpu::Isa> fp4_piece_isas() {
  std::vector<cpu::Isa> out;
  if (cpu::best_isa() >= cpu::Isa::kAVX512 && cpu::cpu_has_avx512_vnni()) out.push_back(cpu::Isa::kAVX512);
  return out;
}

// Every scale byte, decoded 16 at a time and in a 5-byte tail, equals the scalar decoder's
// value times the factor, bit for bit (NaN where it gives NaN).
TEST(Fp4Pieces, ScaleDecodeMatchesTheScalarDecoders) {
  if (cpu::best_isa() < cpu::Isa::kAVX512) GTEST_SKIP() << "no AVX-512";
  std::vector<uint8_t> codes(261);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(i * 37 % 256);
  for (bool e4m3 : {true, false})
    for (float factor : {0.5f, 0.5f * 3.7e-3f}) {
      std::vector<float> got(codes.size(), -1.0f);
      cpu::fp4_decode_scales_avx512(codes.data(), static_cast<int64_t>(codes.size()), {codes.data(), e4m3, factor},
                                    got.data());
      for (size_t i = 0; i < codes.size(); ++i) {
        const float want = (e4m3 ? e4m3_decode(codes[i]) : e8m0_decode(codes[i])) * factor;
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(got[i])) << int(codes[i]);
        } else {
          uint32_t a, b;
          std::memcpy(&a, &got[i], 4);
          std::memcpy(&b, &want, 4);
          EXPECT_EQ(a, b) << (e4m3 ? "e4m3 " : "e8m0 ") << int(codes[i]) << " " << got[i] << " " << want;
        }
      }
    }
}

// out of linear_lowbit (x [M, K]) for w, pieces on or off.
std::vector<float> lowbit_rows(const Fp4Weight& w, const std::vector<float>& x, int64_t M,
                               const std::vector<float>& bias, bool pieces) {
  const FormatInfo& f = *w.info;
  const int64_t groups = w.K / f.block_size;
  std::vector<uint8_t> q = w.q, s = w.scales;
  std::vector<float> ts = w.ts, out(M * w.N, NAN);
  const TensorView tv = view1(ts.data(), DType::kFloat32, 1), bv = view1(const_cast<float*>(bias.data()), DType::kFloat32, w.N);
  cpu::set_activation_pieces_enabled(pieces);
  linear_lowbit(view2(const_cast<float*>(x.data()), DType::kFloat32, M, w.K),
                view2(q.data(), DType::kUInt8, w.N, packed_row_bytes(f, w.K)), view2(s.data(), DType::kUInt8, w.N, groups),
                nullptr, f.has_tensor_scale ? &tv : nullptr, &bv, f.format, f.block_size,
                view2(out.data(), DType::kFloat32, M, w.N), nullptr, GemmBackend::kAuto);
  cpu::set_activation_pieces_enabled(true);
  return out;
}

// Within the pieces' error of float64 over the reference-decoded weight: s / (2 * 254^2) per
// activation (2e-7 max|x| of the row with rounding room) times sum |w|, float32 accumulation
// (1e-6 of sum |w x|), the output's rounding.
void expect_pieces_close(const Fp4Weight& w, const std::vector<float>& x, int64_t M, const std::vector<float>& bias,
                         const std::vector<float>& got, const std::string& what) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data() + m * w.K;
    double xmax = 0;
    for (int64_t k = 0; k < w.K; ++k) xmax = std::max(xmax, std::fabs(double(xm[k])));
    for (int64_t n = 0; n < w.N; ++n) {
      double want = bias[n], sum_w = 0, sum_wx = 0;
      for (int64_t k = 0; k < w.K; ++k) {
        want += double(xm[k]) * w.ref[n * w.K + k];
        sum_w += std::fabs(double(w.ref[n * w.K + k]));
        sum_wx += std::fabs(double(xm[k]) * w.ref[n * w.K + k]);
      }
      const float g = got[m * w.N + n];
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(g)) << what << " m " << m << " n " << n;
        continue;
      }
      EXPECT_NEAR(g, want, 2e-7 * xmax * sum_w + 1e-6 * sum_wx + 1.2e-7 * std::fabs(want) + 1e-30)
          << what << " m " << m << " n " << n;
    }
  }
}

TEST(Fp4Pieces, MatchFloat64WhereTheyRun) {
  if (fp4_piece_isas().empty()) GTEST_SKIP() << "no AVX-512 VNNI";
  const int64_t N = 37;  // four-row steps and single-row tails
  for (cpu::Isa isa_run : fp4_piece_isas())
  for (Format fmt : {Format::kNVFP4, Format::kMXFP4})
    for (int64_t K : {128, 384, 1024, 2304})
      for (int64_t M : {1, 3, 6, 13}) {
        IsaScope isa(isa_run);
        const Fp4Weight w = make_weight(fmt, N, K, 31 + static_cast<uint32_t>(K));
        const std::string what = std::string(cpu::isa_name(isa_run)) + " " + w.info->name + " K=" + std::to_string(K) +
                                 " M=" + std::to_string(M);
        std::vector<float> x = random_weights(M * K, 5 + static_cast<uint32_t>(K + M));
        for (int64_t i = 0; i < M * K; ++i) x[i] *= std::pow(10.0f, static_cast<float>(i % 5) - 2.0f);  // 1e-2 .. 1e2
        const std::vector<float> bias = random_weights(N, 9);
        const std::vector<float> on = lowbit_rows(w, x, M, bias, true), off = lowbit_rows(w, x, M, bias, false);
        expect_pieces_close(w, x, M, bias, on, what + " (pieces)");
        expect_pieces_close(w, x, M, bias, off, what + " (float)");
        if (!cpu::fp4_pieces_fit(fmt, M, K, w.info->block_size)) {
          EXPECT_TRUE(M > 1 && K < cpu::kFp4PieceMinKForRows) << what;
          continue;
        }
        // The kernel itself; linear_lowbit runs it where it reaches the GEMV (small weights
        // past 8 rows take the panel GEMM first).
        cpu::ActivationPieces a;
        ASSERT_TRUE(cpu::split_activation_pieces(view2(x.data(), DType::kFloat32, M, K), w.info->block_size, fmt, a));
        std::vector<uint8_t> q = w.q;
        std::vector<float> direct(M * N, NAN);
        const int64_t groups = K / w.info->block_size;
        const TensorView qv = view2(q.data(), DType::kUInt8, N, packed_row_bytes(*w.info, K)),
                         sv = view2(const_cast<uint8_t*>(w.scales.data()), DType::kUInt8, N, groups),
                         bv = view1(const_cast<float*>(bias.data()), DType::kFloat32, N),
                         ov = view2(direct.data(), DType::kFloat32, M, N);
        const bool nv = fmt == Format::kNVFP4;
        const cpu::WeightOnlyProblem p{qv, sv, nullptr, &bv, ov, K, w.info->block_size, groups, nullptr};
        cpu::linear_fp4_pieces_avx512(p, a, {w.scales.data(), nv, 0.5f * (nv ? w.ts[0] : 1.0f)}, M);
        expect_pieces_close(w, x, M, bias, direct, what + " (kernel)");
        if (M <= 8) {
          EXPECT_NE(on, off) << what << ": the pieces ran";
          EXPECT_EQ(direct, on) << what;
        }
      }
}

// Scale bytes the quantizer does not write (E4M3 NaN, negative, subnormal; E8M0 0 and 255)
// give what the reference gives; rows holding NaN / Inf keep the float kernels (their results
// unchanged by the switch); which shapes the pieces take.
TEST(Fp4Pieces, OddScalesAndInputsTheyLeave) {
  if (fp4_piece_isas().empty()) GTEST_SKIP() << "no AVX-512 VNNI";
  const int64_t N = 8, K = 1152;
  for (cpu::Isa isa_run : fp4_piece_isas())
  for (Format fmt : {Format::kNVFP4, Format::kMXFP4}) {
    IsaScope isa(isa_run);
    Fp4Weight w = make_weight(fmt, N, K, 41);
    const int64_t groups = K / w.info->block_size;
    for (int64_t i = 0; i < N * groups; i += 5) {
      const int b = static_cast<int>(i * 11 % 256);
      w.scales[i] = static_cast<uint8_t>(fmt == Format::kMXFP4 && b > 139 && b != 255 ? b % 140 : b);
    }
    const TensorView tv = view1(w.ts.data(), DType::kFloat32, 1);
    {
      IsaScope scalar(cpu::Isa::kScalar);
      dequantize_lowbit(view2(w.q.data(), DType::kUInt8, N, packed_row_bytes(*w.info, K)),
                        view2(w.scales.data(), DType::kUInt8, N, groups), nullptr,
                        w.info->has_tensor_scale ? &tv : nullptr, fmt, w.info->block_size,
                        view2(w.ref.data(), DType::kFloat32, N, K));
    }
    const std::vector<float> x = random_weights(K, 4), bias(N, 0.25f);
    expect_pieces_close(w, x, 1, bias, lowbit_rows(w, x, 1, bias, true), std::string(w.info->name) + " odd scales");
    for (float bad : {NAN, INFINITY}) {
      std::vector<float> xb = x;
      xb[K / 2] = bad;
      const std::vector<float> on = lowbit_rows(w, xb, 1, bias, true), off = lowbit_rows(w, xb, 1, bias, false);
      EXPECT_EQ(0, std::memcmp(on.data(), off.data(), N * sizeof(float))) << w.info->name << " " << bad;
    }
  }
  IsaScope isa(cpu::Isa::kAVX512);
  EXPECT_TRUE(cpu::fp4_pieces_fit(Format::kNVFP4, 1, 4096, 16));
  const int64_t rows = cpu::pieces_rows(Format::kNVFP4).most;  // 32 on Zen 4, 16 on Zen 5
  EXPECT_EQ(rows, cpu::cpu_has_avx_vnni() ? cpu::kPieceMaxRowsWide : cpu::kPieceMaxRows);
  EXPECT_TRUE(cpu::fp4_pieces_fit(Format::kNVFP4, rows, 1024, 16));
  EXPECT_FALSE(cpu::fp4_pieces_fit(Format::kNVFP4, rows + 1, 4096, 16));
  EXPECT_FALSE(cpu::fp4_pieces_fit(Format::kMXFP4, 2, 768, 32));
  EXPECT_FALSE(cpu::fp4_pieces_fit(Format::kNVFP4, 1, 4000, 16));
  EXPECT_FALSE(cpu::fp4_pieces_fit(Format::kMXFP4, 1, 4096, 16));
  EXPECT_FALSE(cpu::fp4_pieces_fit(Format::kInt4, 1, 4096, 32));
}

}  // namespace
}  // namespace tensorslim
