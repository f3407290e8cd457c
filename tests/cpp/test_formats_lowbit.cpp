// Low-bit rows of the format table (FP8, E2M1, N-bit integers, binary, ternary): every
// code point, round-half-to-even ties, and the AVX-512 decoders / GEMV against the scalar
// reference, bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "tensorslim/formats.h"
#include "tensorslim/lowbit.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::view1;
using testing::view2;

struct SmallFloat {
  const char* name;
  int codes;
  uint8_t (*encode)(float);
  float (*decode)(uint8_t);
};
const SmallFloat kSmallFloats[] = {{"e4m3", 256, e4m3_encode, e4m3_decode},
                                   {"e5m2", 256, e5m2_encode, e5m2_decode},
                                   {"e2m1", 16, e2m1_encode, e2m1_decode}};

TEST(FormatsLowbit, TableRowsAreConsistent) {
  for (int i = 0; i < kNumFormatRows; ++i) {
    const FormatInfo& f = format_table()[i];
    EXPECT_EQ(&format_info(f.format), &f);
    EXPECT_EQ(find_format(f.name), &f);
    EXPECT_EQ(find_format_id(static_cast<int32_t>(f.format)), &f);
    if (f.code_values == nullptr) {  // integers: 2^bits codes, scale divisor as int4/int8
      EXPECT_EQ(f.qmax - f.qmin + 1, 1 << f.bits) << f.name;
      EXPECT_EQ(f.scale_divisor, f.has_zero_point ? f.qmax - f.qmin : f.qmax) << f.name;
    }
    for (int c = 0; f.code_values && f.format != Format::kTernary && c < (1 << f.bits); ++c) {
      const float v = f.decode(c, 1.0f, 0);
      if (std::isnan(v)) continue;
      EXPECT_EQ(v, f.code_values[c]) << f.name << " code " << c;
    }
  }
  EXPECT_EQ(find_format_id(19), nullptr);
  EXPECT_THROW(format_info(static_cast<Format>(19)), ValueError);
  EXPECT_EQ(bytes_per_block(format_info(Format::kNVFP4), 16), static_cast<int64_t>(sizeof(NVFP4Block)));
  EXPECT_EQ(bytes_per_block(format_info(Format::kMXFP4), 32), static_cast<int64_t>(sizeof(MXFP4Block)));
  EXPECT_EQ(packed_row_bytes(format_info(Format::kInt3), 11), 5);
}

TEST(FormatsLowbit, EveryCodeRoundTrips) {
  for (const SmallFloat& f : kSmallFloats) {
    for (int c = 0; c < f.codes; ++c) {
      const float v = f.decode(static_cast<uint8_t>(c));
      if (std::isnan(v)) continue;
      EXPECT_EQ(f.encode(v), c) << f.name << " code " << c << " value " << v;
    }
  }
}

TEST(FormatsLowbit, MidpointsRoundToEven) {
  for (const SmallFloat& f : kSmallFloats) {
    const int sign = f.codes / 2;
    std::vector<int> finite;
    for (int c = 0; c < sign; ++c)
      if (std::isfinite(f.decode(static_cast<uint8_t>(c)))) finite.push_back(c);
    for (size_t i = 0; i + 1 < finite.size(); ++i) {
      const float a = f.decode(finite[i]), b = f.decode(finite[i + 1]);
      const float mid = (a + b) / 2;  // exact: one bit more than the format
      const int even = finite[i] % 2 == 0 ? finite[i] : finite[i + 1];
      EXPECT_EQ(f.encode(mid), even) << f.name << " between " << a << " and " << b;
      EXPECT_EQ(f.encode(-mid), even | sign) << f.name;
      EXPECT_EQ(f.encode(std::nextafter(mid, 0.0f)), finite[i]) << f.name;
      EXPECT_EQ(f.encode(std::nextafter(mid, INFINITY)), finite[i + 1]) << f.name;
    }
    const int max_code = finite.back();
    EXPECT_EQ(f.encode(f.decode(max_code) * 4), max_code) << f.name << " saturates";
    EXPECT_EQ(f.encode(-1e30f), max_code | sign) << f.name;
  }
  EXPECT_EQ(e4m3_decode(0x7E), 448.0f);
  EXPECT_EQ(e4m3_decode(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e5m2_decode(0x7B), 57344.0f);
  EXPECT_EQ(e5m2_encode(INFINITY), 0x7C);
  EXPECT_EQ(e4m3_encode(INFINITY), 0x7E);
  EXPECT_EQ(e4m3_encode(NAN) & 0x7F, 0x7F);
  EXPECT_TRUE(std::isnan(e5m2_decode(e5m2_encode(NAN))));
}

// Quantize with the format, then decode with every ISA: bit-exact with the reference.
TEST(FormatsLowbit, Avx512DecodeMatchesReference) {
  if (cpu::best_isa() != cpu::Isa::kAVX512) GTEST_SKIP() << "no AVX-512";
  const int64_t rows = 6, cols = 192;
  std::vector<float> x = random_weights(rows * cols, 5);
  for (int i = 0; i < kNumFormatRows; ++i) {
    const FormatInfo& f = format_table()[i];
    for (int64_t group : {int64_t(f.block_size ? f.block_size : 32), int64_t(f.block_size ? 0 : cols)}) {
      if (group == 0) continue;
      const int64_t groups = cols / group;
      const bool int8 = f.code_values == nullptr && f.bits == 8 && !f.has_zero_point;
      std::vector<uint8_t> q(rows * packed_row_bytes(f, cols)), zp(rows * groups);
      std::vector<float> scales(rows * groups), ts(1);
      std::vector<uint8_t> scale_bytes(rows * groups);
      const bool byte_scales = f.scale_format != ScaleFormat::kFloat32;
      TensorView qv = view2(q.data(), int8 ? DType::kInt8 : DType::kUInt8, rows, packed_row_bytes(f, cols));
      TensorView sv = byte_scales ? view2(scale_bytes.data(), DType::kUInt8, rows, groups)
                                  : view2(scales.data(), DType::kFloat32, rows, groups);
      TensorView zv = view2(zp.data(), DType::kUInt8, rows, groups);
      TensorView tv = view1(ts.data(), DType::kFloat32, 1);
      const TensorView* zvp = f.has_zero_point ? &zv : nullptr;
      const TensorView* tvp = f.has_tensor_scale ? &tv : nullptr;
      quantize_lowbit(view2(x.data(), DType::kFloat32, rows, cols), f.format, group, qv, sv, zvp, tvp);
      std::vector<float> ref(rows * cols), got(rows * cols);
      cpu::set_isa(cpu::Isa::kScalar);
      dequantize_lowbit(qv, sv, zvp, tvp, f.format, group, view2(ref.data(), DType::kFloat32, rows, cols));
      cpu::set_isa(cpu::Isa::kAVX512);
      dequantize_lowbit(qv, sv, zvp, tvp, f.format, group, view2(got.data(), DType::kFloat32, rows, cols));
      EXPECT_EQ(std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)), 0)
          << f.name << " group " << group;

      // The fused GEMV against float64 over the reference weight.
      for (int64_t M : {1, 5}) {
        std::vector<float> a = random_weights(M * cols, 9), out(M * rows);
        linear_lowbit(view2(a.data(), DType::kFloat32, M, cols), qv, sv, zvp, tvp, nullptr, f.format,
                      group, view2(out.data(), DType::kFloat32, M, rows), nullptr, GemmBackend::kNative);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < rows; ++n) {
            double want = 0, mag = 0;
            for (int64_t k = 0; k < cols; ++k) {
              want += double(a[m * cols + k]) * ref[n * cols + k];
              mag += std::fabs(double(a[m * cols + k]) * ref[n * cols + k]);
            }
            EXPECT_NEAR(out[m * rows + n], want, 1e-6 * mag + 1e-30) << f.name << " m " << m << " n " << n;
          }
      }
    }
  }
}

// quantize_lowbit on the AVX-512 path gives the scalar path's bytes, on awkward values too.
TEST(FormatsLowbit, Avx512QuantizeMatchesScalar) {
  if (cpu::best_isa() != cpu::Isa::kAVX512) GTEST_SKIP() << "no AVX-512";
  const int64_t rows = 5, cols = 160;
  std::vector<float> x = random_weights(rows * cols, 13);
  const float special[] = {0.0f, -0.0f, 1e-40f, -3e-39f, 1e-30f, 7.5f, -7.5f, 1e6f};
  for (int i = 0; i < 8; ++i) x[3 * cols + 5 * i] = special[i];  // row 3: subnormals, zeros, outliers
  for (int64_t r = 0; r < cols; ++r) x[4 * cols + r] = std::ldexp(1.0f, -130) * (r % 7);  // tiny row
  for (int i = 0; i < kNumFormatRows; ++i) {
    const FormatInfo& f = format_table()[i];
    for (int64_t group : {int64_t(f.block_size ? f.block_size : 32), int64_t(f.block_size ? 0 : cols),
                          int64_t(f.block_size ? 0 : -1)}) {
      if (group == 0) continue;
      const int64_t groups = group == -1 ? 1 : cols / group, srows = group == -1 ? 1 : rows;
      const bool int8 = f.code_values == nullptr && f.bits == 8 && !f.has_zero_point;
      const bool byte_scales = f.scale_format != ScaleFormat::kFloat32;
      const int64_t qcols = packed_row_bytes(f, cols);
      std::vector<uint8_t> q[2], sb[2], zp[2];
      std::vector<float> sf[2], ts[2];
      for (int pass = 0; pass < 2; ++pass) {
        q[pass].assign(rows * qcols, 0xAA);
        sb[pass].assign(srows * groups, 0);
        zp[pass].assign(srows * groups, 0);
        sf[pass].assign(srows * groups, 0.0f);
        ts[pass].assign(1, 0.0f);
        TensorView sv = byte_scales ? view2(sb[pass].data(), DType::kUInt8, srows, groups)
                                    : view2(sf[pass].data(), DType::kFloat32, srows, groups);
        TensorView zv = view2(zp[pass].data(), DType::kUInt8, srows, groups);
        TensorView tv = view1(ts[pass].data(), DType::kFloat32, 1);
        cpu::set_isa(pass == 0 ? cpu::Isa::kScalar : cpu::Isa::kAVX512);
        quantize_lowbit(view2(x.data(), DType::kFloat32, rows, cols), f.format, group,
                        view2(q[pass].data(), int8 ? DType::kInt8 : DType::kUInt8, rows, qcols), sv,
                        f.has_zero_point ? &zv : nullptr, f.has_tensor_scale ? &tv : nullptr);
      }
      cpu::set_isa(cpu::Isa::kAVX512);
      EXPECT_EQ(q[0], q[1]) << f.name << " group " << group;
      EXPECT_EQ(sb[0], sb[1]) << f.name << " group " << group;
      EXPECT_EQ(zp[0], zp[1]) << f.name << " group " << group;
      EXPECT_EQ(std::memcmp(sf[0].data(), sf[1].data(), sf[0].size() * 4), 0) << f.name << " group " << group;
      EXPECT_EQ(ts[0], ts[1]) << f.name;
    }
  }
}

TEST(FormatsLowbit, RejectsBadArguments) {
  std::vector<float> x(4 * 64, 1.0f);
  x[2 * 64 + 9] = NAN;
  std::vector<uint8_t> q(4 * 32), s(4 * 4);
  std::vector<float> ts(1);
  TensorView tv = view1(ts.data(), DType::kFloat32, 1);
  auto run = [&](int64_t group, const TensorView* t) {
    quantize_lowbit(view2(x.data(), DType::kFloat32, 4, 64), Format::kNVFP4, group,
                    view2(q.data(), DType::kUInt8, 4, 32), view2(s.data(), DType::kUInt8, 4, 64 / group), nullptr, t);
  };
  try {
    run(16, &tv);
    FAIL() << "NaN accepted";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("row 2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(run(32, &tv), ValueError);      // NVFP4 blocks are 16
  EXPECT_THROW(run(16, nullptr), ValueError);  // needs its tensor scale
}

}  // namespace
}  // namespace tensorslim
