// libFuzzer target: every row of the format table, quantize -> dequantize on arbitrary
// floats (NaN, Inf, subnormals, huge values), group sizes, shapes and strides, and decoding
// of arbitrary code / scale bytes. The core may refuse an input only with a ValueError or
// TypeError; finite inputs that it accepts must decode to no NaN.
#include <cmath>
#include <cstdint>

#include "fuzz_input.h"
#include "tensorslim/lowbit.h"
#include "tensorslim/status.h"

using namespace tensorslim;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in(data, size);
  const FormatInfo& info = format_table()[in.range(0, kNumFormatRows - 1)];
  const int64_t rows = in.range(0, 5), cols = in.range(0, 96);
  const int64_t choice = in.range(0, 4);
  const int64_t group = choice == 0 ? -1 : choice == 1 ? cols : choice == 2 ? in.range(-2, 64)
                        : info.block_size ? info.block_size : 32;
  const DType xdt = in.range(0, 2) == 0 ? DType::kBFloat16 : DType::kFloat32;
  const int64_t xshape[2] = {rows, cols};
  fuzz::Owned x = fuzz::make_view(in, xdt, 2, xshape, in.byte() & 1);
  bool finite = true;
  if (xdt == DType::kFloat32 && in.byte() & 1) {  // mostly ordinary magnitudes, some finite
    for (int64_t i = 0; i < fuzz::extent(x.view); ++i) {
      float& v = x.view.ptr<float>()[i];
      if (!std::isfinite(v)) v = 0.0f;
      v = std::fmod(v, 1e30f);
    }
  } else {
    finite = false;
  }
  const int64_t gcount = group == -1 ? 1 : (group > 0 && cols % group == 0 ? cols / group : 1);
  const int64_t qshape[2] = {rows, packed_row_bytes(info, cols)};
  const int64_t sshape[2] = {group == -1 ? 1 : rows, gcount};
  const int64_t one[1] = {1};
  fuzz::Owned q = fuzz::make_view(in, info.format == Format::kInt8 ? DType::kInt8 : DType::kUInt8, 2,
                                  qshape, false);
  const DType sdt = info.scale_format == ScaleFormat::kFloat32 ? DType::kFloat32 : DType::kUInt8;
  fuzz::Owned s = fuzz::make_view(in, sdt, 2, sshape, false);
  fuzz::Owned z = fuzz::make_view(in, DType::kUInt8, 2, sshape, false);
  fuzz::Owned t = fuzz::make_view(in, DType::kFloat32, 1, one, false);
  const TensorView* zp = info.has_zero_point ? &z.view : nullptr;
  const TensorView* ts = info.has_tensor_scale ? &t.view : nullptr;
  fuzz::Owned out = fuzz::make_view(in, DType::kFloat32, 2, xshape, false);
  const bool encode_first = in.byte() & 1;
  try {
    if (encode_first) quantize_lowbit(x.view, info.format, group, q.view, s.view, zp, ts);
    dequantize_lowbit(q.view, s.view, zp, ts, info.format, group, out.view);
  } catch (const ValueError&) {
    return 0;
  } catch (const TypeError&) {
    return 0;
  }
  if (encode_first && finite)
    for (int64_t i = 0; i < rows * cols; ++i)
      if (std::isnan(out.view.ptr<float>()[i])) __builtin_trap();  // finite in, NaN out
  return 0;
}
