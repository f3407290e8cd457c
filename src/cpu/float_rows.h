// Reading and writing rows of 2-D float views (f32 / bf16 / f16, any strides) as fp32.
#pragma once

#include <cstdint>
#include <vector>

#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace cpu {

inline bool is_float_dtype(DType dt) {
  return dt == DType::kFloat32 || dt == DType::kBFloat16 || dt == DType::kFloat16;
}

// Row r as contiguous fp32: the row itself when it already is, otherwise converted into buf.
const float* row_as_f32(const TensorView& x, int64_t r, std::vector<float>& buf);

// Writes cols fp32 values into row r of out (f32, or rounded to bf16 / f16).
void store_row(const float* src, const TensorView& out, int64_t r);

}  // namespace cpu
}  // namespace tensorslim
