// CUDA entry points (kernels/*.cu), built when nvcc is found. Same semantics and
// layouts as the CPU functions in quantize.h / gemm.h; every view is on one CUDA
// device and work is queued on the view's stream.
#pragma once

#include "tensorslim/formats.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace cuda {

void quantize(const TensorView& x, Format fmt, int64_t group_size, const TensorView& q,
              const TensorView& scales, const TensorView* zero_points);
void dequantize(const TensorView& q, const TensorView& scales, const TensorView* zero_points,
                Format fmt, int64_t group_size, const TensorView& out);
// x: f32/f16/bf16.  For M <= kFusedMaxRows a fused dequantize-GEMV runs; above it the
// weight is dequantized into `workspace` ([N, K] in x's dtype, caller-allocated) and
// cuBLAS multiplies (a tiled fused kernel where cuBLAS is absent).  workspace may be nullptr when M <= kFusedMaxRows.
constexpr int64_t kFusedMaxRows = 8;
void linear_weight_only(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                        const TensorView* zero_points, const TensorView* bias, Format fmt,
                        int64_t group_size, const TensorView& out, const TensorView* workspace);
int device_count();

}  // namespace cuda
}  // namespace tensorslim
