#include "float_rows.h"

#include <algorithm>

#include "half.h"

namespace tensorslim {
namespace cpu {

const float* row_as_f32(const TensorView& x, int64_t r, std::vector<float>& buf) {
  const int64_t cols = x.shape[1], s0 = x.strides[0], s1 = x.strides[1];
  if (x.dtype == DType::kFloat32 && s1 == 1) return x.ptr<float>() + r * s0;
  buf.resize(cols);
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t off = r * s0 + c * s1;
    switch (x.dtype) {
      case DType::kFloat32: buf[c] = x.ptr<float>()[off]; break;
      case DType::kBFloat16: buf[c] = bf16_to_float(x.ptr<uint16_t>()[off]); break;
      default: buf[c] = f16_to_float(x.ptr<uint16_t>()[off]); break;
    }
  }
  return buf.data();
}

void store_row(const float* src, const TensorView& out, int64_t r) {
  const int64_t cols = out.shape[1];
  char* base = static_cast<char*>(out.data) + r * out.strides[0] * dtype_size(out.dtype);
  if (out.dtype == DType::kFloat32) {
    std::copy(src, src + cols, reinterpret_cast<float*>(base));
  } else {
    uint16_t* dst = reinterpret_cast<uint16_t*>(base);
    const bool bf16 = out.dtype == DType::kBFloat16;
    for (int64_t c = 0; c < cols; ++c) dst[c] = bf16 ? float_to_bf16(src[c]) : float_to_f16(src[c]);
  }
}

}  // namespace cpu
}  // namespace tensorslim
