// Every ISA path of quantize/dequantize against a direct transcription of the spec
// in quantize.h, bit for bit, on odd shapes and strided inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "half.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::view2;

struct Expected {
  std::vector<uint8_t> q;
  std::vector<float> scales;
  std::vector<uint8_t> zps;
};

// The spec, written independently of src/cpu: per group, range -> scale/zp -> encode.
Expected spec(const std::vector<float>& x, int64_t rows, int64_t cols, int64_t ld, Format fmt,
              int64_t group) {
  const FormatInfo& f = format_info(fmt);
  const bool per_tensor = group == -1;
  // ceil(cols / group) groups, the last one short when group does not divide cols.
  const int64_t gsize = per_tensor ? cols : std::min(group, cols);
  const int64_t groups = per_tensor ? 1 : (gsize ? (cols + gsize - 1) / gsize : 1);
  Expected e;
  const int64_t nb = packed_row_bytes(f, cols);
  e.q.assign(rows * nb, 0);
  e.scales.assign(per_tensor ? 1 : rows * groups, 0.0f);
  e.zps.assign(e.scales.size(), 0);
  auto params = [&](float lo, float hi, float* s, int* z) {
    lo = std::min(lo, 0.0f);
    hi = std::max(hi, 0.0f);
    float sc = f.has_zero_point ? (hi - lo) / f.scale_divisor : std::max(-lo, hi) / f.scale_divisor;
    if (!(sc > 0)) sc = 1.0f;
    *s = sc;
    *z = f.has_zero_point ? (int)std::min<float>(std::max<float>(std::nearbyint(-lo / sc), f.qmin), f.qmax) : 0;
  };
  float ts = 1.0f;
  int tz = 0;
  if (per_tensor) {
    float lo = 0, hi = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) lo = std::min(lo, x[r * ld + c]), hi = std::max(hi, x[r * ld + c]);
    params(lo, hi, &ts, &tz);
    e.scales[0] = ts;
    e.zps[0] = tz;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float s = ts;
      int z = tz;
      if (!per_tensor) {
        float lo = 0, hi = 0;
        for (int64_t c = g * gsize; c < std::min((g + 1) * gsize, cols); ++c)
          lo = std::min(lo, x[r * ld + c]), hi = std::max(hi, x[r * ld + c]);
        params(lo, hi, &s, &z);
        e.scales[r * groups + g] = s;
        e.zps[r * groups + g] = z;
      }
      for (int64_t c = g * gsize; c < std::min((g + 1) * gsize, cols); ++c) {
        const uint8_t code = static_cast<uint8_t>(f.encode(x[r * ld + c], s, z));
        if (f.bits == 8)
          e.q[r * nb + c] = code;
        else
          e.q[r * nb + c / 2] |= static_cast<uint8_t>((code & 0xF) << (4 * (c & 1)));
      }
    }
  return e;
}

std::vector<cpu::Isa> isas() {
  std::vector<cpu::Isa> out = {cpu::Isa::kScalar};
  if (cpu::best_isa() >= cpu::Isa::kAVX2) out.push_back(cpu::Isa::kAVX2);
  if (cpu::best_isa() >= cpu::Isa::kAVX512) out.push_back(cpu::Isa::kAVX512);
  return out;
}

class IsaGuard {
 public:
  explicit IsaGuard(cpu::Isa isa) : saved_(cpu::active_isa()) { cpu::set_isa(isa); }
  ~IsaGuard() { cpu::set_isa(saved_); }

 private:
  cpu::Isa saved_;
};

void check_case(Format fmt, int64_t rows, int64_t cols, int64_t group, int64_t pad, uint32_t seed) {
  const FormatInfo& f = format_info(fmt);
  const int64_t ld = cols + pad;  // pad > 0: rows are strided
  std::vector<float> x = random_weights(rows * ld, seed);
  if (f.has_zero_point)
    for (auto& v : x) v = v * 0.5f + 0.7f;  // off-centre data exercises the zero point
  const Expected want = spec(x, rows, cols, ld, fmt, group);
  const int64_t groups = want.scales.size() / (group == -1 ? 1 : std::max<int64_t>(rows, 1));
  for (cpu::Isa isa : isas()) {
    IsaGuard guard(isa);
    std::vector<uint8_t> q(rows * packed_row_bytes(f, cols), 0xAA), zps(want.zps.size());
    std::vector<float> scales(want.scales.size());
    const DType qdt = (f.bits == 8 && !f.has_zero_point) ? DType::kInt8 : DType::kUInt8;
    TensorView sv = group == -1 ? view2(scales.data(), DType::kFloat32, 1, 1)
                                : view2(scales.data(), DType::kFloat32, rows, groups);
    TensorView zv = sv;
    zv.data = zps.data();
    zv.dtype = DType::kUInt8;
    quantize(view2(x.data(), DType::kFloat32, rows, cols, ld), fmt, group,
             view2(q.data(), qdt, rows, packed_row_bytes(f, cols)), sv,
             f.has_zero_point ? &zv : nullptr);
    const std::string where = std::string(f.name) + " " + cpu::isa_name(isa) + " rows=" +
                              std::to_string(rows) + " cols=" + std::to_string(cols) +
                              " group=" + std::to_string(group);
    ASSERT_EQ(q, want.q) << where;
    ASSERT_EQ(0, std::memcmp(scales.data(), want.scales.data(), scales.size() * 4)) << where;
    if (f.has_zero_point) ASSERT_EQ(zps, want.zps) << where;

    // Dequantize: (q - zp) * scale exactly, and the round trip error is within half a step.
    std::vector<float> back(rows * cols);
    dequantize(view2(q.data(), qdt, rows, packed_row_bytes(f, cols)), sv,
               f.has_zero_point ? &zv : nullptr, fmt, group,
               view2(back.data(), DType::kFloat32, rows, cols));
    const int64_t gsize = group == -1 ? cols : std::min(group, cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t idx = group == -1 ? 0 : r * groups + (gsize ? c / gsize : 0);
        int code = f.bits == 8 ? q[r * cols + c] : (q[r * ((cols + 1) / 2) + c / 2] >> (4 * (c & 1))) & 0xF;
        if (!f.has_zero_point) code = f.bits == 8 ? (int8_t)code : (code ^ 8) - 8;
        const float expect = f.decode(code, scales[idx], f.has_zero_point ? zps[idx] : 0);
        ASSERT_EQ(back[r * cols + c], expect) << where;
        ASSERT_LE(std::fabs(back[r * cols + c] - x[r * ld + c]), 0.5001f * scales[idx]) << where;
      }
  }
}

TEST(Quantize, EveryIsaMatchesSpecBitForBit) {
  uint32_t seed = 1;
  for (int fi = 0; fi < kNumFormats; ++fi) {
    const Format fmt = format_table()[fi].format;
    // 100, 576, 1000, 200, 96 (g64), 37: a short last group (or one group narrower than g).
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 256}, {7, 96}, {13, 512}, {3, 37},
                              {5, 100}, {2, 576}, {3, 1000}, {4, 200}}) {
      std::vector<int64_t> groups = {-1, cols};
      for (int64_t g : {32, 64, 128, 256}) groups.push_back(g);
      for (int64_t g : groups)
        for (int64_t pad : {0, 5}) check_case(fmt, rows, cols, g, pad, seed++);
    }
  }
}

TEST(Quantize, RejectsNonFiniteValues) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY}) {
    for (cpu::Isa isa : isas()) {
      IsaGuard guard(isa);
      std::vector<float> x(4 * 64, 1.0f);
      x[2 * 64 + 17] = bad;
      std::vector<int8_t> q(4 * 64);
      std::vector<float> s(4 * 2);
      for (int64_t group : {int64_t{32}, int64_t{-1}}) {
        TensorView sv = group == -1 ? view2(s.data(), DType::kFloat32, 1, 1)
                                    : view2(s.data(), DType::kFloat32, 4, 2);
        try {
          quantize(view2(x.data(), DType::kFloat32, 4, 64), Format::kInt8, group,
                   view2(q.data(), DType::kInt8, 4, 64), sv, nullptr);
          FAIL() << "no error for a non-finite value on " << cpu::isa_name(isa);
        } catch (const ValueError& e) {
          EXPECT_NE(std::string(e.what()).find("row 2"), std::string::npos) << e.what();
        }
      }
    }
  }
}

TEST(Quantize, RejectsBadArguments) {
  std::vector<float> x(4 * 96, 1.0f), s(16);
  std::vector<uint8_t> q(4 * 96), z(16);
  // 96 in groups of 64: two groups (the last one of 32), not one scale per row.
  EXPECT_THROW(quantize(view2(x.data(), DType::kFloat32, 4, 96), Format::kInt4, 64,
                        view2(q.data(), DType::kUInt8, 4, 48),
                        view2(s.data(), DType::kFloat32, 4, 1), nullptr),
               ValueError);
  // Group sizes 0 and below -1; an odd INT4 group size with several groups.
  for (int64_t bad : {int64_t{0}, int64_t{-2}})
    EXPECT_THROW(quantize(view2(x.data(), DType::kFloat32, 4, 96), Format::kInt8, bad,
                          view2(q.data(), DType::kInt8, 4, 96),
                          view2(s.data(), DType::kFloat32, 4, 1), nullptr),
                 ValueError);
  EXPECT_THROW(quantize(view2(x.data(), DType::kFloat32, 4, 96), Format::kInt4, 33,
                        view2(q.data(), DType::kUInt8, 4, 48),
                        view2(s.data(), DType::kFloat32, 4, 3), nullptr),
               ValueError);
  // Asymmetric format without zero points.
  EXPECT_THROW(quantize(view2(x.data(), DType::kFloat32, 4, 96), Format::kUInt8, 96,
                        view2(q.data(), DType::kUInt8, 4, 96),
                        view2(s.data(), DType::kFloat32, 4, 1), nullptr),
               ValueError);
  // Integer input.
  EXPECT_THROW(quantize(view2(q.data(), DType::kUInt8, 4, 96), Format::kInt8, 96,
                        view2(q.data(), DType::kInt8, 4, 96),
                        view2(s.data(), DType::kFloat32, 4, 1), nullptr),
               TypeError);
  // Wrong q shape.
  EXPECT_THROW(quantize(view2(x.data(), DType::kFloat32, 4, 96), Format::kInt8, 96,
                        view2(q.data(), DType::kInt8, 4, 48),
                        view2(s.data(), DType::kFloat32, 4, 1), nullptr),
               ValueError);
}

TEST(Quantize, EmptyTensors) {
  std::vector<float> s(1, 0.0f);
  int8_t q = 0;
  quantize(view2(nullptr, DType::kFloat32, 0, 64), Format::kInt8, -1,
           view2(&q, DType::kInt8, 0, 64), view2(s.data(), DType::kFloat32, 1, 1), nullptr);
  EXPECT_EQ(s[0], 1.0f);  // an empty tensor has the neutral scale
  quantize(view2(nullptr, DType::kFloat32, 0, 64), Format::kInt8, 32,
           view2(&q, DType::kInt8, 0, 64), view2(s.data(), DType::kFloat32, 0, 2), nullptr);
  // Rows of length 0 with a group size have no groups (once a division by zero).
  uint8_t zp = 0;
  for (Format f : {Format::kInt8, Format::kUInt4}) {
    const bool asym = format_info(f).has_zero_point;
    const DType code = asym ? DType::kUInt8 : DType::kInt8;
    TensorView zv = view2(&zp, DType::kUInt8, 3, 0);
    quantize(view2(nullptr, DType::kFloat32, 3, 0), f, 32, view2(&q, code, 3, 0),
             view2(s.data(), DType::kFloat32, 3, 0), asym ? &zv : nullptr);
    dequantize(view2(&q, code, 3, 0), view2(s.data(), DType::kFloat32, 3, 0), asym ? &zv : nullptr,
               f, 32, view2(nullptr, DType::kFloat32, 3, 0));
  }
}

TEST(Quantize, HalfInputsMatchFloatInputs) {
  // bf16 / f16 inputs widen exactly, so they quantize like their fp32 values.
  const int64_t rows = 5, cols = 64;
  std::vector<float> x = random_weights(rows * cols, 7);
  std::vector<uint16_t> hb(x.size()), hh(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    hb[i] = cpu::float_to_bf16(x[i]);
    hh[i] = cpu::float_to_f16(x[i]);
  }
  for (auto [half, dt, widen] : {std::tuple{&hb, DType::kBFloat16, &cpu::bf16_to_float},
                                 std::tuple{&hh, DType::kFloat16, &cpu::f16_to_float}}) {
    std::vector<float> xf(x.size());
    for (size_t i = 0; i < x.size(); ++i) xf[i] = widen((*half)[i]);
    std::vector<int8_t> qa(rows * cols), qb(rows * cols);
    std::vector<float> sa(rows * 2), sb(rows * 2);
    quantize(view2(half->data(), dt, rows, cols), Format::kInt8, 32,
             view2(qa.data(), DType::kInt8, rows, cols), view2(sa.data(), DType::kFloat32, rows, 2), nullptr);
    quantize(view2(xf.data(), DType::kFloat32, rows, cols), Format::kInt8, 32,
             view2(qb.data(), DType::kInt8, rows, cols), view2(sb.data(), DType::kFloat32, rows, 2), nullptr);
    EXPECT_EQ(qa, qb);
    EXPECT_EQ(sa, sb);
  }
}

TEST(Half, ConversionsRoundTripAndRoundToNearestEven) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = cpu::f16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(f)) ASSERT_EQ(cpu::float_to_f16(f), h) << h;
    const float b = cpu::bf16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(b)) ASSERT_EQ(cpu::float_to_bf16(b), h) << h;
  }
  EXPECT_EQ(cpu::float_to_f16(1.0f + 1.0f / 2048), 0x3C00);  // tie -> even
  EXPECT_EQ(cpu::float_to_f16(1.0f + 3.0f / 2048), 0x3C02);
  EXPECT_EQ(cpu::float_to_f16(70000.0f), 0x7C00);
  EXPECT_EQ(cpu::float_to_bf16(1.0f + 1.0f / 256), 0x3F80);
}

}  // namespace
}  // namespace tensorslim
