#include "tensorslim/formats.h"

#include <cmath>
#include <cstring>
#include <string>

#include "tensorslim/status.h"

namespace tensorslim {
namespace {

int32_t clamp_code(float v, int32_t lo, int32_t hi) {
  v = std::fmin(std::fmax(v, static_cast<float>(lo)), static_cast<float>(hi));
  return static_cast<int32_t>(v);
}

// std::nearbyint rounds half to even in the default rounding mode.
template <int32_t QMIN, int32_t QMAX>
int32_t encode_int(float x, float scale, int32_t zero_point) {
  float r = std::nearbyint(x / scale) + static_cast<float>(zero_point);
  return clamp_code(r, QMIN, QMAX);
}

float decode_int(int32_t code, float scale, int32_t zero_point) {
  return static_cast<float>(code - zero_point) * scale;
}

const FormatInfo kTable[kNumFormats] = {
    {Format::kInt8, "int8", 8, false, -128, 127, 127, 0, ScaleFormat::kFloat32,
     encode_int<-128, 127>, decode_int},
    {Format::kUInt8, "uint8", 8, true, 0, 255, 255, 0, ScaleFormat::kFloat32,
     encode_int<0, 255>, decode_int},
    {Format::kInt4, "int4", 4, false, -8, 7, 7, 0, ScaleFormat::kFloat32, encode_int<-8, 7>,
     decode_int},
    {Format::kUInt4, "uint4", 4, true, 0, 15, 15, 0, ScaleFormat::kFloat32, encode_int<0, 15>,
     decode_int},
};

}  // namespace

const FormatInfo* format_table() { return kTable; }

const FormatInfo& format_info(Format f) {
  for (const auto& row : kTable)
    if (row.format == f) return row;
  throw ValueError("unknown format id " + std::to_string(static_cast<int>(f)));
}

const FormatInfo* find_format(const char* name) {
  for (const auto& row : kTable)
    if (std::strcmp(row.name, name) == 0) return &row;
  return nullptr;
}

int64_t bytes_per_block(const FormatInfo& info, int64_t group) {
  return (group * info.bits + 7) / 8 + 4 + (info.has_zero_point ? 1 : 0);
}

}  // namespace tensorslim
