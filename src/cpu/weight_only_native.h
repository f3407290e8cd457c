// What the native weight-only GEMV kernels share (gemm_avx512.cpp, gemm_avx2.cpp): the
// problem they solve, the activation layout they read, and which shapes they take.
#pragma once

#include <cstdint>
#include <vector>

#include "aligned_buffer.h"
#include "tensorslim/formats.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace cpu {

struct WeightOnlyProblem {
  const TensorView& qweight;
  const TensorView& scales;
  const TensorView* zero_points;
  const TensorView* bias;
  const TensorView& out;
  int64_t K, gsize, groups;
  const float* xp;  // activations as pack_activations lays them out
};

// x as contiguous fp32 rows. INT4: byte j of a 32-value block holds k = 2j (low nibble) and
// 2j + 1 (high), so each block is stored de-interleaved: 16 even-k values, then 16 odd-k.
void pack_activations(const TensorView& x, bool deinterleave, AlignedFloats& xp);

// The kernels: out = x @ dequantize(qweight)^T + bias for the integer formats, K and the
// group size multiples of 32 (INT4) or 16 (INT8).
void linear_weight_only_avx512(const WeightOnlyProblem& p, Format fmt, int64_t M);
void linear_weight_only_avx2(const WeightOnlyProblem& p, Format fmt, int64_t M);

// Compute-bound batches: the weight decoded once per call, panel by panel (panel_gemm.h), any
// K and group. False when the active ISA has no vector kernel.
bool linear_weight_only_panels(const TensorView& x, const TensorView& qweight,
                               const TensorView& scales, const TensorView* zero_points,
                               const TensorView* bias, Format fmt, int64_t group_size,
                               const TensorView& out);

}  // namespace cpu
}  // namespace tensorslim
