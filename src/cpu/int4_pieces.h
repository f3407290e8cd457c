// Weight-only INT4 at batch 1 (and a few rows on AVX-512), with the activations as three int8
// pieces. Decoding a nibble into a float costs the float kernels a shuffle or two per 16
// weights, which kept them below memory speed at batch 1 (Zen 4, 4096 x 4096: 51% of copy
// bandwidth on AVX-512, 35% on AVX2); the integer units multiply the nibbles as they are:
// vpdpbusd (AVX-512 VNNI) 64 at a time, vpmaddubsw + vpmaddwd (AVX2) 32 at a time.
//
// Each activation row m is split, with one step s = max|x[m]| / 127, into
//   x = s * (h + l1 / 254 + l2 / 254^2),  h, l1, l2 in [-127, 127]
// (h = rne(x / s); l1 and l2 round the remainders scaled by 254), so x is kept to within
// s / (2 * 254^2) ~ 6e-8 * max|x[m]|: the precision float32 gives the row's largest value.
// The weight side is exact: nibble codes (signed ones flipped to code + 8) times the pieces
// sum exactly in int32, and a group's sum becomes float once, then times the group's scale;
// the zero point (8 for signed) is taken off at the end with the pieces' group sums.
#pragma once

#include <cstdint>
#include <vector>

#include "aligned_buffer.h"
#include "tensorslim/tensor_view.h"
#include "weight_only_native.h"

namespace tensorslim {
namespace cpu {

constexpr int64_t kPieceBlock = 128;  // activation values per block: 64 packed weight bytes
// Each further activation row costs three more products per block, and each row a split and
// a per-row sum. Measured against the float kernels (Zen 4, N = 4096, g128): AVX-512 batch 1
// ran 1.29x (K = 768) to 1.71x (K = 11008) faster, batches 2-4 1.05-1.28x from K = 2048 and
// down to 0.91x below; AVX2 batch 1 1.2-1.6x, batch 2 0.76-1.0x, so batch 1 only there.
constexpr int64_t kPieceMaxRows = 4;
constexpr int64_t kPieceMinKForRows = 2048;  // K from which batches 2..kPieceMaxRows take it

// Per activation row: blocks of kPieceBlock values, each stored as h, then l1, then l2, each
// as the block's 64 even-k values followed by its 64 odd-k values (the low and high nibbles
// of 64 packed bytes).
struct ActivationPieces {
  std::vector<int8_t, CacheLineAllocator<int8_t>> q;  // [M][K / 128][3][128]
  std::vector<float> step;                            // [M]: s
  std::vector<float> group_sums;                      // [M][groups]: sum of h + l1/254 + l2/254^2
};

constexpr float kPieceRadix = 254.0f;  // l1 and l2 count 1/254ths of the piece before them

// Whether a pieces kernel takes this problem: AVX-512 active on a CPU with VNNI, or AVX2
// active (batch 1); K and the group (gsize = min(group, K)) multiples of kPieceBlock; and the
// kernels switched on (set_int4_pieces_enabled, tensorslim/gemm.h).
bool int4_pieces_fit(int64_t M, int64_t K, int64_t gsize);

// Splits x (float32 or bfloat16 rows) into pieces. False (nothing to use) where a row holds
// NaN or Inf, or its largest magnitude is below 1e-30 but not 0 (its step would be
// subnormal): the float kernels keep those inputs' exact semantics.
bool split_activation_pieces(const TensorView& x, int64_t gsize, ActivationPieces& out);
bool split_activation_pieces_avx512(const TensorView& x, int64_t gsize, ActivationPieces& out);
bool split_activation_pieces_avx2(const TensorView& x, int64_t gsize, ActivationPieces& out);

// out = x @ dequantize(qweight)^T + bias for INT4 (signed) or UINT4 (with zero points).
void linear_int4_pieces(const WeightOnlyProblem& p, const ActivationPieces& a, bool is_signed,
                        int64_t M);
void linear_int4_pieces_avx512(const WeightOnlyProblem& p, const ActivationPieces& a,
                               bool is_signed, int64_t M);
void linear_int4_pieces_avx2(const WeightOnlyProblem& p, const ActivationPieces& a,
                             bool is_signed, int64_t M);

}  // namespace cpu
}  // namespace tensorslim
