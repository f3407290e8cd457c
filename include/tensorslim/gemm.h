// Matrix products with quantized weights.
#pragma once

#include "tensorslim/formats.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {

enum class GemmBackend : int32_t {
  kAuto = 0,       // the fastest path that fits
  kReference = 1,  // scalar, the specification
  kNative = 2,     // our vectorized kernels (AVX-512 / AVX2 on CPU, CUDA on GPU)
  kOneDNN = 3,     // oneDNN weight-decompression matmul (CPU)
};

// out[M, N] = x[M, K] @ dequantize(qweight)[N, K]^T + bias.
// x: f32 or bf16 (f16 too on CUDA), rows contiguous.  qweight: [N, packed K] int8/uint8.
// scales: [N, K/group] f32.  zero_points: same shape uint8 or nullptr.  bias: [N] f32 or
// nullptr.  out: [M, N], the dtype of x.  Weight layout as produced by quantize().
void linear_weight_only(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                        const TensorView* zero_points, const TensorView* bias, Format fmt,
                        int64_t group_size, const TensorView& out, GemmBackend backend);

// Checks the arguments above; returns K.
int64_t check_linear_args(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                          const TensorView* zero_points, const TensorView* bias, Format fmt,
                          int64_t group_size, const TensorView& out);

namespace cpu {
void linear_weight_only_reference(const TensorView& x, const TensorView& qweight,
                                  const TensorView& scales, const TensorView* zero_points,
                                  const TensorView* bias, Format fmt, int64_t group_size,
                                  const TensorView& out);
// Returns false when no native kernel fits (shape, ISA) so the caller falls back.
bool linear_weight_only_native(const TensorView& x, const TensorView& qweight,
                               const TensorView& scales, const TensorView* zero_points,
                               const TensorView* bias, Format fmt, int64_t group_size,
                               const TensorView& out);
// Returns false when oneDNN has no implementation for this combination.
bool linear_weight_only_onednn(const TensorView& x, const TensorView& qweight,
                               const TensorView& scales, const TensorView* zero_points,
                               const TensorView* bias, Format fmt, int64_t group_size,
                               const TensorView& out);
// Integer weight-only at a few rows runs with the activations as int8 pieces (AVX-512 VNNI,
// AVX2; src/cpu/activation_pieces.h); tests and benchmarks switch that off to run the float
// kernels.
void set_activation_pieces_enabled(bool enabled);
bool activation_pieces_enabled();
// The fewest / most activation rows the active ISA's pieces kernel takes fmt at on this CPU (by
// CPU kind: src/cpu/activation_pieces.h); {0, 0} where it has none for fmt.
struct PiecesRows {
  int64_t fewest = 0, most = 0;
};
PiecesRows pieces_rows(Format fmt);
}  // namespace cpu

}  // namespace tensorslim
