// Sparse weight storage and sparse x dense linears (docs/formats.md, "Sparse storage").
//
// W is [N, K] (N = out_features rows, K = in_features).
//
// N:M ("nm"), m in {4, 8}, 1 <= n < m: G = ceil(K / m) groups of m columns per row, each
// storing exactly n slots.
//   values  [N, G*n]  float32 / bfloat16 / float16 / int8 (int8: w ~= code * scales[row]), or
//           uint8 [N, 8 * ceil(G*n / 16)]: int4 codes in [-7, 7] (two's complement nibbles,
//           w ~= code * scales[row]), each row a run of little-endian 64-bit words, word c holding
//           slots 16c .. 16c+15: slot 16c + k at nibble (k % 2) * 8 + k / 2 (bits 4*that ..
//           4*that+3), i.e. the even slots in the low 32 bits, the odd ones in the high 32, each
//           in order (one broadcast and two shifts put 16 codes in 32-bit lanes); unused nibbles 0
//   indices [N, ceil(G*n*b / 8)] uint8, b = 2 (m = 4) or 3 (m = 8): per row a little-endian
//           bit stream (LSB first) of the in-group positions, slot after slot, strictly
//           increasing within a group; unused bits 0.
//   A group with fewer than n kept weights fills its free slots with the smallest unused
//   positions and value 0. The last group of a row has r = K - (G-1)*m real columns;
//   positions >= r are virtual zero columns (value 0; kernels never read x there).
//
// CSR ("csr"): values [nnz] float32 / int8 (+ scales [N]), cols uint16 [nnz] (K <= 65536),
// row_ptr int64 [N+1]; row r is entries row_ptr[r] .. row_ptr[r+1]-1, columns increasing.
//
// Packing takes the dense float32 weight and a uint8 keep mask (nonzero = keep). int8 / int4
// values are symmetric per row: scale = max|kept| / qmax (qmax 127 / 7; 1 for a row with
// nothing nonzero kept), code = clamp(round_half_even(w / scale), -qmax, qmax), all in float32.
//
// Linears: y[M, N] = x[M, K] @ W^T (+ bias[N]), x float32 with contiguous rows, y float32.
// Batches over 1 row may run on transposed activations and need a float32 workspace of
// sparse_linear_workspace(M, K) elements (0 for M <= 1), allocated by the caller.
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

int nm_index_bits(int m);                             // 2 for m = 4, 3 for m = 8
int64_t nm_slots(int64_t K, int n, int m);            // G * n, slots per row
int64_t nm_index_bytes(int64_t K, int n, int m);      // indices bytes per row

// scales: float32 [N] output for int8 / int4 values, else nullptr.
void nm_pack(const TensorView& w, const TensorView& keep, int n, int m, const TensorView& values,
             const TensorView& indices, const TensorView* scales);
// out: float32 [N, K]; the dense weight the packed form stands for.
void nm_unpack(const TensorView& values, const TensorView& indices, const TensorView* scales, int n,
               int m, const TensorView& out);
void nm_linear(const TensorView& x, const TensorView& values, const TensorView& indices,
               const TensorView* scales, const TensorView* bias, int n, int m, const TensorView& out,
               const TensorView* workspace);

// row_ptr (int64 [N+1]) is given by the caller (the running count of keep per row) and
// checked against keep; values / cols [row_ptr[N]] are filled.
void csr_pack(const TensorView& w, const TensorView& keep, const TensorView& row_ptr,
              const TensorView& values, const TensorView& cols, const TensorView* scales);
void csr_unpack(const TensorView& values, const TensorView& cols, const TensorView& row_ptr,
                const TensorView* scales, const TensorView& out);
void csr_linear(const TensorView& x, const TensorView& values, const TensorView& cols,
                const TensorView& row_ptr, const TensorView* scales, const TensorView* bias,
                const TensorView& out, const TensorView* workspace);

// float32 elements of workspace the linears need for a batch of M rows of width K.
int64_t sparse_linear_workspace(int64_t M, int64_t K);

namespace cpu {
// How the x86 sparse kernels read values at scattered indices (x at a CSR row's columns at
// batches 1 and 2, a convolution's input offset per weight column): gathers (true) or scalar
// loads (false). Gathers by default on Intel CPUs, scalar loads elsewhere (AMD's gathers are
// microcoded); the same sums either way. Tests run both.
bool sparse_gathers();
void set_sparse_gathers(bool on);
}  // namespace cpu

// Convolutions: out[B, N, Ho, Wo] = conv2d(x[B, C, H, W], W, groups) (+ bias[N]) with zero
// padding, W [N, C/groups*kh*kw] stored in either layout with its columns in torch's (c, ky, kx)
// order (output channels [q*N/groups, (q+1)*N/groups) read input group q), x and out float32
// contiguous. x is first copied into per-image input planes (a
// float32 workspace of sparse_conv2d_workspace elements, allocated by the caller) in which
// each weight column's inputs for consecutive output positions are contiguous, and the
// transposed kernels run on them as on a linear's tiles (docs/formats.md, "Sparse
// convolutions").
struct ConvGeometry {
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, groups = 1;
};
int64_t sparse_conv2d_workspace(int64_t B, int64_t C, int64_t H, int64_t W, const ConvGeometry& g);
void nm_conv2d(const TensorView& x, const TensorView& values, const TensorView& indices, const TensorView* scales,
               const TensorView* bias, int n, int m, const ConvGeometry& g, const TensorView& out,
               const TensorView& workspace);
void csr_conv2d(const TensorView& x, const TensorView& values, const TensorView& cols, const TensorView& row_ptr,
                const TensorView* scales, const TensorView* bias, const ConvGeometry& g, const TensorView& out,
                const TensorView& workspace);

}  // namespace tensorslim
