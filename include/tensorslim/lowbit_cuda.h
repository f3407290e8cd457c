// CUDA versions of lowbit.h's decode paths (kernels/lowbit.cu), built when nvcc is found.
// Same layouts and the same decoded values, bit for bit, as the CPU functions.
#pragma once

#include "tensorslim/formats.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace cuda {

// out: [rows, cols] f32 with contiguous rows; every view on one CUDA device.
void dequantize_lowbit(const TensorView& q, const TensorView& scales,
                       const TensorView* zero_points, const TensorView* tensor_scale, Format fmt,
                       int64_t group_size, const TensorView& out);

// out[M, N] = x[M, K] @ dequantize_lowbit(qweight)^T + bias, x / out f32. Codes are decoded
// in registers by a warp per output column, for up to 8 activation rows per launch.
void linear_lowbit(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                   const TensorView* zero_points, const TensorView* tensor_scale,
                   const TensorView* bias, Format fmt, int64_t group_size, const TensorView& out);

}  // namespace cuda
}  // namespace tensorslim
