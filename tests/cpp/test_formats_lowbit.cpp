// Low-bit rows of the format table (FP8, E2M1, N-bit integers, binary, ternary): every
// code point, round-half-to-even ties, and the AVX-512 / AVX2 decoders, encoders and GEMV
// against the scalar reference, bit for bit.
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

// The vector ISAs this CPU runs (AVX2, AVX-512), each tested against the scalar path.
std::vector<cpu::Isa> vector_isas() {
  std::vector<cpu::Isa> out;
  if (cpu::best_isa() >= cpu::Isa::kAVX2) out.push_back(cpu::Isa::kAVX2);
  if (cpu::best_isa() >= cpu::Isa::kAVX512) out.push_back(cpu::Isa::kAVX512);
  return out;
}

// Puts the active ISA back as it was (the avx2.* ctest pass starts capped at AVX2).
struct IsaGuard {
  cpu::Isa saved = cpu::active_isa();
  ~IsaGuard() { cpu::set_isa(saved); }
};

int lanes_of(cpu::Isa isa) { return isa == cpu::Isa::kAVX512 ? 16 : 8; }

// Quantize with the format, then decode with every ISA: bit-exact with the reference. The
// shapes include K = 200 and group 8 (multiples of AVX2's 8 lanes, not of AVX-512's 16:
// the AVX-512 path falls back for group 8, the AVX2 one runs; per row, both run with a
// scalar tail), and a row count that is not a
// multiple of the GEMV's 4-row blocks.
TEST(FormatsLowbit, VectorDecodeMatchesReference) {
  if (vector_isas().empty()) GTEST_SKIP() << "no AVX2";
  IsaGuard guard;
  const int64_t rows = 7;
  for (int64_t cols : {192, 200}) {
    std::vector<float> x = random_weights(rows * cols, 5 + cols);
    for (int i = 0; i < kNumFormatRows; ++i) {
      const FormatInfo& f = format_table()[i];
      std::vector<int64_t> group_sizes = {cols};
      if (f.block_size) group_sizes = {f.block_size};
      else group_sizes.push_back(8), group_sizes.push_back(cols % 32 == 0 ? 32 : 40);
      for (int64_t group : group_sizes) {
        if (cols % group) continue;
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
        cpu::set_isa(cpu::Isa::kScalar);
        quantize_lowbit(view2(x.data(), DType::kFloat32, rows, cols), f.format, group, qv, sv, zvp, tvp);
        std::vector<float> ref(rows * cols);
        dequantize_lowbit(qv, sv, zvp, tvp, f.format, group, view2(ref.data(), DType::kFloat32, rows, cols));
        for (cpu::Isa isa : vector_isas()) {
          cpu::set_isa(isa);
          // One group per row, or groups that start on a whole step (any K: a scalar tail).
          const bool fits = group >= cols || group % lanes_of(isa) == 0;
          EXPECT_EQ(cpu::linear_lowbit_native_fits(f, cols, group), fits);
          std::vector<float> got(rows * cols);
          dequantize_lowbit(qv, sv, zvp, tvp, f.format, group, view2(got.data(), DType::kFloat32, rows, cols));
          EXPECT_EQ(std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)), 0)
              << f.name << " cols " << cols << " group " << group << " " << cpu::isa_name(isa);

          // The fused GEMV (every pass size and its tail) against float64 over the reference weight.
          for (int64_t M : {1, 2, 3, 5, 9}) {
            std::vector<float> a = random_weights(M * cols, 9), out(M * rows);
            linear_lowbit(view2(a.data(), DType::kFloat32, M, cols), qv, sv, zvp, tvp, nullptr, f.format,
                          group, view2(out.data(), DType::kFloat32, M, rows), nullptr,
                          fits ? GemmBackend::kNative : GemmBackend::kAuto);
            for (int64_t m = 0; m < M; ++m)
              for (int64_t n = 0; n < rows; ++n) {
                double want = 0, mag = 0;
                for (int64_t k = 0; k < cols; ++k) {
                  want += double(a[m * cols + k]) * ref[n * cols + k];
                  mag += std::fabs(double(a[m * cols + k]) * ref[n * cols + k]);
                }
                EXPECT_NEAR(out[m * rows + n], want, 1e-6 * mag + 1e-30)
                    << f.name << " m " << m << " n " << n << " " << cpu::isa_name(isa);
              }
          }
        }
      }
    }
  }
}

// Bit for bit, except that any NaN equals any NaN: the reference's NaN is sign * quiet_NaN,
// whose sign bit the compiler and the x86 NaN rules decide, not the format.
bool same_bits_or_both_nan(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], 4) != 0 && !(std::isnan(a[i]) && std::isnan(b[i]))) return false;
  return true;
}

// Codes the quantizer never writes (E4M3 / E5M2 NaN and Inf, every 4-bit pattern) decode
// as the reference decodes them, on every vector ISA.
TEST(FormatsLowbit, VectorDecodeOfEveryBytePattern) {
  if (vector_isas().empty()) GTEST_SKIP() << "no AVX2";
  IsaGuard guard;
  const int64_t rows = 3, cols = 256;
  for (int i = 0; i < kNumFormatRows; ++i) {
    const FormatInfo& f = format_table()[i];
    const int64_t group = f.block_size ? f.block_size : 32, groups = cols / group;
    const int64_t bytes = packed_row_bytes(f, cols);
    std::vector<uint8_t> q(rows * bytes), zp(rows * groups), sb(rows * groups);
    std::vector<float> sf(rows * groups), ts{0.37f};
    for (size_t j = 0; j < q.size(); ++j) q[j] = static_cast<uint8_t>(j * 37 + j / 256);
    for (size_t j = 0; j < sf.size(); ++j) {
      sf[j] = 0.01f * (j + 1);
      sb[j] = static_cast<uint8_t>(f.scale_format == ScaleFormat::kE4M3 ? j % 0x7E + 1 : j * 7 % 254 + 1);
      zp[j] = static_cast<uint8_t>(j % (1 << f.bits));
    }
    const bool int8 = f.code_values == nullptr && f.bits == 8 && !f.has_zero_point;
    TensorView qv = view2(q.data(), int8 ? DType::kInt8 : DType::kUInt8, rows, bytes);
    TensorView sv = f.scale_format != ScaleFormat::kFloat32 ? view2(sb.data(), DType::kUInt8, rows, groups)
                                                            : view2(sf.data(), DType::kFloat32, rows, groups);
    TensorView zv = view2(zp.data(), DType::kUInt8, rows, groups);
    TensorView tv = view1(ts.data(), DType::kFloat32, 1);
    const TensorView* zvp = f.has_zero_point ? &zv : nullptr;
    const TensorView* tvp = f.has_tensor_scale ? &tv : nullptr;
    std::vector<float> ref(rows * cols), got(rows * cols);
    cpu::set_isa(cpu::Isa::kScalar);
    dequantize_lowbit(qv, sv, zvp, tvp, f.format, group, view2(ref.data(), DType::kFloat32, rows, cols));
    for (cpu::Isa isa : vector_isas()) {
      cpu::set_isa(isa);
      dequantize_lowbit(qv, sv, zvp, tvp, f.format, group, view2(got.data(), DType::kFloat32, rows, cols));
      EXPECT_TRUE(same_bits_or_both_nan(ref, got)) << f.name << " " << cpu::isa_name(isa);
    }
  }
}

// The FP8 GEMV's two paths: rows without Inf/NaN codes and with moderate scales take the
// folded-scale path, the others (a huge scale, a NaN or Inf code) the general one; a
// 4-row block mixing them, and blocks of clean rows, all match float64 over the reference.
// cols = 120: a NaN code at 110, decoded by a whole step but past the row check's whole vectors
// (64 bytes on AVX-512, 32 on AVX2).
TEST(FormatsLowbit, VectorFp8GemvSpecialRowsAndScales) {
  if (vector_isas().empty()) GTEST_SKIP() << "no AVX2";
  IsaGuard guard;
  const int64_t rows = 9;
  for (int64_t cols : {64, 120})
  for (Format fmt : {Format::kFP8E4M3, Format::kFP8E5M2}) {
    const FormatInfo& f = format_info(fmt);
    std::vector<uint8_t> q(rows * cols);
    std::vector<float> sc(rows);
    for (int64_t r = 0; r < rows; ++r) {
      sc[r] = 0.01f * (r + 1);
      for (int64_t k = 0; k < cols; ++k) q[r * cols + k] = static_cast<uint8_t>((r * 31 + k * 7) % 0x70 | (k & 1) << 7);
    }
    sc[1] = std::ldexp(1.0f, 100);                                       // scale * 2^(127 - bias) overflows
    q[2 * cols + 5] = fmt == Format::kFP8E4M3 ? 0xFF : 0x7E;            // NaN code
    if (fmt == Format::kFP8E5M2) q[6 * cols + 9] = 0xFC;                 // -Inf code
    if (cols == 120) q[4 * cols + 110] = 0x7F;                          // NaN in both formats
    const TensorView qv = view2(q.data(), DType::kUInt8, rows, cols), sv = view2(sc.data(), DType::kFloat32, rows, 1);
    std::vector<float> ref(rows * cols);
    cpu::set_isa(cpu::Isa::kScalar);
    dequantize_lowbit(qv, sv, nullptr, nullptr, fmt, cols, view2(ref.data(), DType::kFloat32, rows, cols));
    for (cpu::Isa isa : vector_isas()) {
      cpu::set_isa(isa);
      for (int64_t M : {1, 2, 5}) {
        std::vector<float> a = random_weights(M * cols, 3), out(M * rows);
        linear_lowbit(view2(a.data(), DType::kFloat32, M, cols), qv, sv, nullptr, nullptr, nullptr, fmt, cols,
                      view2(out.data(), DType::kFloat32, M, rows), nullptr, GemmBackend::kNative);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < rows; ++n) {
            double want = 0, mag = 0;
            for (int64_t k = 0; k < cols; ++k) {
              want += double(a[m * cols + k]) * ref[n * cols + k];
              mag += std::fabs(double(a[m * cols + k]) * ref[n * cols + k]);
            }
            const float got = out[m * rows + n];
            if (std::isnan(want) || std::isinf(want))
              EXPECT_TRUE(std::isnan(got) ? std::isnan(want) : got == want) << f.name << " n " << n << " " << got;
            else
              EXPECT_NEAR(got, want, 1e-6 * mag + 1e-30) << f.name << " m " << m << " n " << n << " " << cpu::isa_name(isa);
          }
      }
    }
  }
}

// quantize_lowbit on each vector path gives the scalar path's bytes, on awkward values too;
// cols = 164 leaves a tail of 4 after whole vectors of 8 and 16.
TEST(FormatsLowbit, VectorQuantizeMatchesScalar) {
  if (vector_isas().empty()) GTEST_SKIP() << "no AVX2";
  IsaGuard guard;
  const int64_t rows = 5;
  for (int64_t cols : {160, 164}) {
    std::vector<float> x = random_weights(rows * cols, 13);
    const float special[] = {0.0f, -0.0f, 1e-40f, -3e-39f, 1e-30f, 7.5f, -7.5f, 1e6f};
    for (int i = 0; i < 8; ++i) x[3 * cols + 5 * i] = special[i];  // row 3: subnormals, zeros, outliers
    for (int64_t r = 0; r < cols; ++r) x[4 * cols + r] = std::ldexp(1.0f, -130) * (r % 7);  // tiny row
    for (int i = 0; i < kNumFormatRows; ++i) {
      const FormatInfo& f = format_table()[i];
      for (int64_t group : {int64_t(f.block_size ? f.block_size : 4), int64_t(f.block_size ? 0 : cols),
                            int64_t(f.block_size ? 0 : -1)}) {
        if (group == 0 || (group > 0 && cols % group) || (group > 0 && group * f.bits % 8)) continue;
        const int64_t groups = group == -1 ? 1 : cols / group, srows = group == -1 ? 1 : rows;
        const bool int8 = f.code_values == nullptr && f.bits == 8 && !f.has_zero_point;
        const bool byte_scales = f.scale_format != ScaleFormat::kFloat32;
        const int64_t qcols = packed_row_bytes(f, cols);
        std::vector<cpu::Isa> isas = vector_isas();
        isas.insert(isas.begin(), cpu::Isa::kScalar);
        const size_t P = isas.size();
        std::vector<std::vector<uint8_t>> q(P), sb(P), zp(P);
        std::vector<std::vector<float>> sf(P), ts(P);
        for (size_t pass = 0; pass < P; ++pass) {
          q[pass].assign(rows * qcols, 0xAA);
          sb[pass].assign(srows * groups, 0);
          zp[pass].assign(srows * groups, 0);
          sf[pass].assign(srows * groups, 0.0f);
          ts[pass].assign(1, 0.0f);
          TensorView sv = byte_scales ? view2(sb[pass].data(), DType::kUInt8, srows, groups)
                                      : view2(sf[pass].data(), DType::kFloat32, srows, groups);
          TensorView zv = view2(zp[pass].data(), DType::kUInt8, srows, groups);
          TensorView tv = view1(ts[pass].data(), DType::kFloat32, 1);
          cpu::set_isa(isas[pass]);
          quantize_lowbit(view2(x.data(), DType::kFloat32, rows, cols), f.format, group,
                          view2(q[pass].data(), int8 ? DType::kInt8 : DType::kUInt8, rows, qcols), sv,
                          f.has_zero_point ? &zv : nullptr, f.has_tensor_scale ? &tv : nullptr);
        }
        for (size_t pass = 1; pass < P; ++pass) {
          const char* isa = cpu::isa_name(isas[pass]);
          EXPECT_EQ(q[0], q[pass]) << f.name << " group " << group << " " << isa;
          EXPECT_EQ(sb[0], sb[pass]) << f.name << " group " << group << " " << isa;
          EXPECT_EQ(zp[0], zp[pass]) << f.name << " group " << group << " " << isa;
          EXPECT_EQ(std::memcmp(sf[0].data(), sf[pass].data(), sf[0].size() * 4), 0)
              << f.name << " group " << group << " " << isa;
          EXPECT_EQ(ts[0], ts[pass]) << f.name << " " << isa;
        }
      }
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
