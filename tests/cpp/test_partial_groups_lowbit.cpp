// Rows whose length is not a multiple of the group / block (issue 15): ceil(K / group) groups,
// the last one short. Every low-bit row of the format table and W4A8 on K = 100, 200, 1000 and
// K below the group: the encodings bit-exact on every ISA, the short group's scale computed
// from its values only, the decoders bit-exact, the GEMVs against float64 (low-bit) or
// bit-exact (W4A8).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "tensorslim/formats.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/lowbit.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::IsaScope;
using testing::machine_isas;
using testing::random_weights;
using testing::view1;
using testing::view2;

// One quantized [rows, cols] weight in a low-bit format and its views.
struct Quantized {
  const FormatInfo* f;
  int64_t rows, cols, group, groups;
  std::vector<uint8_t> q, sb, zp;
  std::vector<float> sf, ts;
  TensorView qv, sv, zv, tv;
  const TensorView* zvp() const { return f->has_zero_point ? &zv : nullptr; }
  const TensorView* tvp() const { return f->has_tensor_scale ? &tv : nullptr; }
};

Quantized quantize_with(const FormatInfo& f, const std::vector<float>& x, int64_t rows, int64_t cols,
                        int64_t group) {
  Quantized r;
  r.f = &f, r.rows = rows, r.cols = cols, r.group = group;
  r.groups = lowbit_groups(cols, group);
  const bool int8 = f.code_values == nullptr && f.bits == 8 && !f.has_zero_point;
  const int64_t bytes = packed_row_bytes(f, cols);
  r.q.assign(rows * bytes, 0xAA);  // every byte written, the padding bits too
  r.sb.assign(rows * r.groups, 0);
  r.zp.assign(rows * r.groups, 0);
  r.sf.assign(rows * r.groups, 0.0f);
  r.ts.assign(1, 0.0f);
  r.qv = view2(r.q.data(), int8 ? DType::kInt8 : DType::kUInt8, rows, bytes);
  r.sv = f.scale_format != ScaleFormat::kFloat32 ? view2(r.sb.data(), DType::kUInt8, rows, r.groups)
                                                 : view2(r.sf.data(), DType::kFloat32, rows, r.groups);
  r.zv = view2(r.zp.data(), DType::kUInt8, rows, r.groups);
  r.tv = view1(r.ts.data(), DType::kFloat32, 1);
  quantize_lowbit(view2(const_cast<float*>(x.data()), DType::kFloat32, rows, cols), f.format, group,
                  r.qv, r.sv, r.zvp(), r.tvp());
  return r;
}

// Group sizes a format takes: its block, else 32 / 64 / 128 (whole bytes for every width).
std::vector<int64_t> groups_of(const FormatInfo& f) {
  if (f.block_size) return {f.block_size};
  return {32, 64, 128};
}

const int64_t kWidths[] = {100, 200, 1000, 10};  // 10: shorter than any group

TEST(PartialGroupsLowbit, QuantizeIsBitExactOnEveryIsaAndTheShortGroupStandsAlone) {
  const int64_t rows = 5;
  for (int64_t cols : kWidths) {
    std::vector<float> x = random_weights(rows * cols, 31 + cols);
    for (int i = 0; i < kNumFormatRows; ++i) {
      const FormatInfo& f = format_table()[i];
      for (int64_t group : groups_of(f)) {
        if (cols % group == 0) continue;
        const std::string what = std::string(f.name) + " K " + std::to_string(cols) + " g " +
                                 std::to_string(group);
        Quantized ref;
        {
          IsaScope scope(cpu::Isa::kScalar);
          ref = quantize_with(f, x, rows, cols, group);
        }
        ASSERT_EQ(ref.groups, (cols + group - 1) / group) << what;
        for (cpu::Isa isa : machine_isas()) {
          IsaScope scope(isa);
          Quantized got = quantize_with(f, x, rows, cols, group);
          EXPECT_EQ(ref.q, got.q) << what << " " << cpu::isa_name(isa);
          EXPECT_EQ(ref.sb, got.sb) << what << " " << cpu::isa_name(isa);
          EXPECT_EQ(ref.zp, got.zp) << what << " " << cpu::isa_name(isa);
          EXPECT_EQ(std::memcmp(ref.sf.data(), got.sf.data(), ref.sf.size() * 4), 0) << what;
          EXPECT_EQ(ref.ts, got.ts) << what;
        }
        // The bits past the row's last code are zero.
        const int64_t bytes = packed_row_bytes(f, cols), used = cols * f.bits % 8;
        for (int64_t r = 0; r < rows && used; ++r)
          EXPECT_EQ(ref.q[r * bytes + bytes - 1] >> used, 0) << what;
        // The short group alone (its values as a row of their own): the same scale and codes
        // (NVFP4: the block scale is that of its amax under the whole tensor's scale).
        const int64_t start = (ref.groups - 1) * group, len = cols - start;
        std::vector<float> tail(rows * len);
        for (int64_t r = 0; r < rows; ++r)
          std::copy(x.begin() + r * cols + start, x.begin() + (r + 1) * cols, tail.begin() + r * len);
        const Quantized alone = quantize_with(f, tail, rows, len, f.block_size ? group : len);
        std::vector<int32_t> a(cols), b(len);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t last = r * ref.groups + ref.groups - 1;
          if (f.has_tensor_scale) {
            float amax = 0.0f;
            for (int64_t k = 0; k < len; ++k) amax = std::fmax(amax, std::fabs(tail[r * len + k]));
            EXPECT_EQ(ref.sb[last], e4m3_encode(amax / 6.0f / ref.ts[0])) << what << " row " << r;
            continue;
          }
          EXPECT_EQ(ref.sb[last], alone.sb[r]) << what << " row " << r;
          EXPECT_EQ(ref.zp[last], alone.zp[r]) << what << " row " << r;
          EXPECT_EQ(ref.sf[last], alone.sf[r]) << what << " row " << r;
          cpu::unpack_codes(ref.q.data() + r * bytes, cols, f.bits, false, a.data());
          cpu::unpack_codes(alone.q.data() + r * packed_row_bytes(f, len), len, f.bits, false, b.data());
          EXPECT_TRUE(std::equal(b.begin(), b.end(), a.begin() + start)) << what << " row " << r;
        }
      }
    }
  }
}

TEST(PartialGroupsLowbit, DecodeAndLinearMatchTheReferenceOnEveryIsa) {
  const int64_t rows = 7;  // not a multiple of the GEMV's 4-row blocks
  for (int64_t cols : kWidths) {
    std::vector<float> x = random_weights(rows * cols, 17 + cols);
    for (int i = 0; i < kNumFormatRows; ++i) {
      const FormatInfo& f = format_table()[i];
      std::vector<int64_t> gs = groups_of(f);
      if (!f.block_size) gs.push_back(cols);  // per channel on a row no step divides
      for (int64_t group : gs) {
        if (cols % group == 0 && group != cols) continue;
        const std::string what = std::string(f.name) + " K " + std::to_string(cols) + " g " +
                                 std::to_string(group);
        Quantized w;
        std::vector<float> ref(rows * cols);
        {
          IsaScope scope(cpu::Isa::kScalar);
          w = quantize_with(f, x, rows, cols, group);
          dequantize_lowbit(w.qv, w.sv, w.zvp(), w.tvp(), f.format, group,
                            view2(ref.data(), DType::kFloat32, rows, cols));
        }
        // The reference against the format's decode, value by value.
        std::vector<int32_t> codes(cols);
        const bool sext = f.code_values == nullptr && !f.has_zero_point;
        for (int64_t r = 0; r < rows; ++r) {
          cpu::unpack_codes(w.q.data() + r * packed_row_bytes(f, cols), cols, f.bits, sext, codes.data());
          for (int64_t k = 0; k < cols; ++k) {
            const int64_t idx = r * w.groups + k / group;
            float want;
            if (f.scale_format == ScaleFormat::kE4M3)
              want = (f.code_values[codes[k]] * e4m3_decode(w.sb[idx])) * w.ts[0];
            else if (f.scale_format == ScaleFormat::kE8M0)
              want = f.code_values[codes[k]] * e8m0_decode(w.sb[idx]);
            else if (f.code_values)
              want = f.code_values[codes[k]] * w.sf[idx];
            else
              want = static_cast<float>(codes[k] - (f.has_zero_point ? w.zp[idx] : 0)) * w.sf[idx];
            ASSERT_EQ(std::memcmp(&want, &ref[r * cols + k], 4), 0) << what << " r " << r << " k " << k;
          }
        }
        for (cpu::Isa isa : machine_isas()) {
          IsaScope scope(isa);
          const bool fits = isa != cpu::Isa::kScalar;  // groups of 16/32/64/128 or one per row
          EXPECT_EQ(cpu::linear_lowbit_native_fits(f, cols, group), fits) << what;
          std::vector<float> got(rows * cols);
          dequantize_lowbit(w.qv, w.sv, w.zvp(), w.tvp(), f.format, group,
                            view2(got.data(), DType::kFloat32, rows, cols));
          EXPECT_EQ(std::memcmp(ref.data(), got.data(), ref.size() * 4), 0) << what << " " << cpu::isa_name(isa);
          for (int64_t M : {1, 3, 8, 17}) {
            std::vector<float> a = random_weights(M * cols, 9 + M), out(M * rows), ws(3 * cols);
            const std::vector<float> bias = random_weights(rows, 4);
            const TensorView bv = view1(const_cast<float*>(bias.data()), DType::kFloat32, rows);
            for (bool with_ws : {false, true}) {  // M > the GEMV's rows with a workspace: decode + sgemm
              TensorView wsv = view2(ws.data(), DType::kFloat32, 3, cols);
              linear_lowbit(view2(a.data(), DType::kFloat32, M, cols), w.qv, w.sv, w.zvp(), w.tvp(), &bv,
                            f.format, group, view2(out.data(), DType::kFloat32, M, rows),
                            with_ws ? &wsv : nullptr, fits ? GemmBackend::kNative : GemmBackend::kAuto);
              for (int64_t m = 0; m < M; ++m)
                for (int64_t n = 0; n < rows; ++n) {
                  double want = bias[n], mag = std::fabs(bias[n]);
                  for (int64_t k = 0; k < cols; ++k) {
                    want += double(a[m * cols + k]) * ref[n * cols + k];
                    mag += std::fabs(double(a[m * cols + k]) * ref[n * cols + k]);
                  }
                  ASSERT_NEAR(out[m * rows + n], want, 1e-6 * mag + 1e-30)
                      << what << " M " << M << " m " << m << " n " << n << " " << cpu::isa_name(isa);
                }
            }
          }
        }
      }
    }
  }
}

TEST(PartialGroupsLowbit, ValuesReferenceDecodesAnyRange) {
  const FormatInfo& f = format_info(Format::kInt3);
  std::vector<float> x = random_weights(2 * 100, 3);
  Quantized w = quantize_with(f, x, 2, 100, 32);
  std::vector<float> ref(2 * 100);
  dequantize_lowbit(w.qv, w.sv, nullptr, nullptr, f.format, 32, view2(ref.data(), DType::kFloat32, 2, 100));
  const cpu::LowbitWeight lw{&f, w.q.data(), packed_row_bytes(f, 100), w.sf.data(), nullptr, 1.0f,
                             w.groups, 32, w.groups};
  for (int64_t k0 : {0, 1, 5, 31, 32, 63, 96, 99})
    for (int64_t k1 : {k0, k0 + 1, int64_t(100)}) {
      if (k1 > 100) continue;
      std::vector<float> got(k1 - k0 + 1, -7.0f);
      cpu::dequantize_values_reference(lw, 1, k0, k1, got.data());
      EXPECT_EQ(std::memcmp(got.data(), ref.data() + 100 + k0, (k1 - k0) * 4), 0) << k0 << ".." << k1;
      EXPECT_EQ(got[k1 - k0], -7.0f);  // nothing written past k1
    }
}

TEST(PartialGroupsLowbit, BlockFormatsStillNeedTheirBlockSize) {
  std::vector<float> x(2 * 100, 1.0f);
  std::vector<uint8_t> q(2 * 50), s(2 * 7);
  std::vector<float> ts(1);
  TensorView tv = view1(ts.data(), DType::kFloat32, 1);
  EXPECT_THROW(quantize_lowbit(view2(x.data(), DType::kFloat32, 2, 100), Format::kNVFP4, 32,
                               view2(q.data(), DType::kUInt8, 2, 50), view2(s.data(), DType::kUInt8, 2, 4),
                               nullptr, &tv),
               ValueError);
  // ceil(100 / 16) = 7 block scales per row, not 6.
  EXPECT_THROW(quantize_lowbit(view2(x.data(), DType::kFloat32, 2, 100), Format::kNVFP4, 16,
                               view2(q.data(), DType::kUInt8, 2, 50), view2(s.data(), DType::kUInt8, 2, 6),
                               nullptr, &tv),
               ValueError);
  quantize_lowbit(view2(x.data(), DType::kFloat32, 2, 100), Format::kNVFP4, 16,
                  view2(q.data(), DType::kUInt8, 2, 50), view2(s.data(), DType::kUInt8, 2, 7), nullptr, &tv);
  // int3 with more than one group: the groups must stay whole bytes.
  std::vector<float> sf(2 * 10);
  std::vector<uint8_t> q3(2 * packed_row_bytes(format_info(Format::kInt3), 100));
  EXPECT_THROW(quantize_lowbit(view2(x.data(), DType::kFloat32, 2, 100), Format::kInt3, 10,
                               view2(q3.data(), DType::kUInt8, 2, int64_t(q3.size() / 2)),
                               view2(sf.data(), DType::kFloat32, 2, 10), nullptr, nullptr),
               ValueError);
  EXPECT_THROW(quantize_lowbit(view2(x.data(), DType::kFloat32, 2, 100), Format::kInt3, 0,
                               view2(q3.data(), DType::kUInt8, 2, int64_t(q3.size() / 2)),
                               view2(sf.data(), DType::kFloat32, 2, 10), nullptr, nullptr),
               ValueError);
}

// ---------------------------------------------------------------- W4A8

struct W4A8Case {
  int64_t K, group;
};
const W4A8Case kW4A8Cases[] = {{576, 128}, {100, 64}, {1000, 128}, {100, 128}, {200, 48}};

TEST(PartialGroupsW4A8, EveryIsaMatchesTheSpecificationBitForBit) {
  const int64_t N = 19;
  for (const W4A8Case& c : kW4A8Cases) {
    for (Format fmt : {Format::kInt4, Format::kUInt4}) {
      const FormatInfo& f = format_info(fmt);
      const std::vector<float> wf = random_weights(N * c.K, 11 + c.K);
      const Quantized w = quantize_with(f, wf, N, c.K, c.group);
      ASSERT_EQ(w.groups, (c.K + c.group - 1) / c.group);
      const std::vector<float> bias = random_weights(N, 2);
      const TensorView bv = view1(const_cast<float*>(bias.data()), DType::kFloat32, N);
      for (int64_t M : {1, 3, 8, 17}) {
        const std::string what = std::string(f.name) + " K " + std::to_string(c.K) + " g " +
                                 std::to_string(c.group) + " M " + std::to_string(M);
        std::vector<float> x = random_weights(M * c.K, 5 + M);
        // The specification, written out: per-token codes, exact group dots, fp32 rescale.
        std::vector<int8_t> qx(M * c.K);
        std::vector<float> as(M), want(M * N);
        quantize_per_token(view2(x.data(), DType::kFloat32, M, c.K), nullptr,
                           view2(qx.data(), DType::kInt8, M, c.K), view1(as.data(), DType::kFloat32, M),
                           GemmBackend::kReference);
        std::vector<int32_t> codes(c.K);
        for (int64_t n = 0; n < N; ++n) {
          cpu::unpack_codes(w.q.data() + n * ((c.K + 1) / 2), c.K, 4, fmt == Format::kInt4, codes.data());
          for (int64_t m = 0; m < M; ++m) {
            float acc = 0.0f;
            for (int64_t g = 0; g < w.groups; ++g) {
              const int32_t o = fmt == Format::kUInt4 ? w.zp[n * w.groups + g] : 0;
              int32_t d = 0;
              for (int64_t k = g * c.group; k < std::min(c.K, (g + 1) * c.group); ++k)
                d += (codes[k] - o) * qx[m * c.K + k];
              acc = acc + static_cast<float>(d) * w.sf[n * w.groups + g];
            }
            want[m * N + n] = acc * as[m] + bias[n];
          }
        }
        for (GemmBackend be : {GemmBackend::kReference, GemmBackend::kNative}) {
          for (cpu::Isa isa : machine_isas()) {
            if (be == GemmBackend::kNative && isa == cpu::Isa::kScalar) continue;
            IsaScope scope(isa);
            if (be == GemmBackend::kNative) {
              EXPECT_TRUE(cpu::linear_w4a8_native_fits(c.K, c.group)) << what;
              EXPECT_STRNE(linear_w4a8_kernel(c.K, c.group), "reference") << what;
            }
            std::vector<float> out(M * N, -1.0f);
            linear_w4a8(view2(x.data(), DType::kFloat32, M, c.K), w.qv, w.sv, w.zvp(), &bv, fmt, c.group,
                        view2(out.data(), DType::kFloat32, M, N), be);
            EXPECT_EQ(std::memcmp(out.data(), want.data(), out.size() * 4), 0)
                << what << " " << cpu::isa_name(isa) << (be == GemmBackend::kNative ? " native" : " reference");
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace tensorslim
