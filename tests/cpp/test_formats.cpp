#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "tensorslim/formats.h"

namespace tensorslim {
namespace {

TEST(FormatTable, RowsAreConsistent) {
  for (int i = 0; i < kNumFormats; ++i) {
    const FormatInfo& f = format_table()[i];
    EXPECT_EQ(&format_info(f.format), &f);
    EXPECT_EQ(find_format(f.name), &f);
    EXPECT_EQ(f.qmax - f.qmin + 1, 1 << f.bits) << f.name;
    // Symmetric formats divide by qmax (|x| <= amax maps inside [-qmax, qmax]);
    // asymmetric ones by the full code range.
    EXPECT_EQ(f.scale_divisor, f.has_zero_point ? f.qmax - f.qmin : f.qmax) << f.name;
  }
  EXPECT_EQ(find_format("nope"), nullptr);
}

TEST(FormatTable, BytesPerBlock) {
  // INT4 g128: 64 bytes of codes + a 4-byte scale; UINT4 adds a zero-point byte.
  EXPECT_EQ(bytes_per_block(format_info(Format::kInt4), 128), 68);
  EXPECT_EQ(bytes_per_block(format_info(Format::kUInt4), 128), 69);
  EXPECT_EQ(bytes_per_block(format_info(Format::kInt8), 32), 36);
  EXPECT_EQ(packed_row_bytes(format_info(Format::kInt4), 7), 4);
}

TEST(FormatTable, EncodeRoundsHalfToEvenAndSaturates) {
  const FormatInfo& s8 = format_info(Format::kInt8);
  EXPECT_EQ(s8.encode(2.5f, 1.0f, 0), 2);
  EXPECT_EQ(s8.encode(3.5f, 1.0f, 0), 4);
  EXPECT_EQ(s8.encode(-2.5f, 1.0f, 0), -2);
  EXPECT_EQ(s8.encode(1000.0f, 1.0f, 0), 127);
  EXPECT_EQ(s8.encode(-1000.0f, 1.0f, 0), -128);
  const FormatInfo& u4 = format_info(Format::kUInt4);
  EXPECT_EQ(u4.encode(0.0f, 0.5f, 3), 3);
  EXPECT_EQ(u4.encode(-10.0f, 0.5f, 3), 0);
  EXPECT_EQ(u4.encode(10.0f, 0.5f, 3), 15);
  EXPECT_FLOAT_EQ(u4.decode(5, 0.5f, 3), 1.0f);
  const FormatInfo& s4 = format_info(Format::kInt4);
  for (int c = s4.qmin; c <= s4.qmax; ++c) EXPECT_EQ(s4.encode(s4.decode(c, 0.25f, 0), 0.25f, 0), c);
}

}  // namespace
}  // namespace tensorslim
