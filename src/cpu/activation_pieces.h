// Integer weight-only at a few activation rows, with the activations as three int8 pieces.
// Decoding a code into a float costs the float kernels a shuffle or two per 16 weights, which
// kept INT4 below memory speed at batch 1 (Zen 4, 4096 x 4096: 51% of copy bandwidth on
// AVX-512, 35% on AVX2) and INT8 compute-bound from batch 2; the integer units multiply the
// codes as they are: vpdpbusd (AVX-512 VNNI) 64 at a time, vpmaddubsw + vpmaddwd (AVX2, INT4
// only: nibble pairs cannot saturate there, byte codes could) 32 at a time.
//
// Each activation row m is split, with one step s = max|x[m]| / 127, into
//   x = s * (h + l1 / 254 + l2 / 254^2),  h, l1, l2 in [-127, 127]
// (h = rne(x / s); l1 and l2 round the remainders scaled by 254), so x is kept to within
// s / (2 * 254^2) ~ 6e-8 * max|x[m]|: the precision float32 gives the row's largest value.
// The weight side is exact: codes as unsigned bytes (signed ones + 8 for INT4, + 128 for INT8)
// times the pieces sum exactly in int32, and a group's sum becomes float once, then times the
// group's scale; the zero point (8 or 128 for the signed formats) is taken off at the end with
// the pieces' group sums.
#pragma once

#include <cstdint>
#include <vector>

#include "aligned_buffer.h"
#include "tensorslim/formats.h"
#include "tensorslim/gemm.h"
#include "tensorslim/tensor_view.h"
#include "weight_only_native.h"

namespace tensorslim {
namespace cpu {

constexpr int64_t kPieceBlock = 128;  // activation values per block (64 INT4 / 128 INT8 bytes)
// Each further activation row costs three more products per block, and each row a split and
// a per-row sum. Measured against the float kernels (Zen 4, N = 4096): INT4 g128 on AVX-512,
// batch 1 1.29x (K = 768) to 1.71x (K = 11008) faster, batches 2-8 1.03-1.28x from K = 2048
// and down to 0.91x below; INT4 on AVX2, batch 1 1.2-1.6x, batch 2 0.76-1.0x, so batch 1
// only; INT8 per channel on AVX-512, batches 2-8 1.09-1.40x from K = 4096, 1.0-1.2x at 1024,
// 0.84-0.91x at 384, and batch 1 equal (both at memory speed). Past 8 rows they replace the
// panel GEMM and oneDNN: INT4 / INT8 at 12-32 rows 1.08-3.1x the panel GEMM and 1.09-1.56x
// oneDNN (K = 2048-11008); at 64 rows 0.89-1.32x and 0.92-0.99x, so up to 32 rows.
// Zen 5 runs 512-bit FMAs at full width, so its float kernels gained more than the pieces'
// vpdpbusd (A / B, N x K = 4096 / 11008 x 4096 and 4096 x 11008, docs/benchmarks.md): INT4 g128
// 1.02-1.38x at 1-3 rows, 0.88-1.06x at 4-8, 0.65-0.83x at 12-32; INT8 0.76-1.61x at 2-16,
// 0.82-1.01x at 24-32; NVFP4 / MXFP4 1.04-1.49x at 1-16, 0.81-0.90x at 32 (pieces_rows).
constexpr int64_t kPieceMaxRows = 32;
constexpr int64_t kPieceMaxRowsWide = 16;      // INT8 and FP4 on Zen 5
constexpr int64_t kPieceMaxRowsWideInt4 = 8;   // INT4 on Zen 5
// INT8 on Zen 5 with the weights read from memory (layers in turn), float / pieces at 2 / 4 /
// 8 / 12 / 16 rows: 0.75-0.87 / 0.80-0.98 / 0.87-1.01 / 1.14-1.25 / 1.02-1.04x.
constexpr int64_t kPieceMinRowsWideInt8 = 9;
constexpr int64_t kPieceMinKForRows = 2048;  // K from which batches of 2 and more take them
// AVX2 with vpdpbusd: INT4 batches up to this (AVX2 without: 1). AVX512-VNNI's EVEX form
// standing in on Zen 4: 1.03-1.55x the float kernel at 2-8 rows; AVX-VNNI (VEX) on Zen 5:
// 1.16-2.02x at 1-4 rows (g128), 0.81-0.87x at 6-8 on weights beyond its L3.
constexpr int64_t kPieceMaxRowsEvexVnni = 8;
constexpr int64_t kPieceMaxRowsAvxVnni = 4;

// pieces_rows (tensorslim/gemm.h): the fewest / most rows the active ISA's pieces kernel takes
// fmt at (more than one from K = kPieceMinKForRows, FP4 from kFp4PieceMinKForRows). CPUID does
// not tell a full-width 512-bit CPU from a split one; of the two measured, Zen 5 has AVX-VNNI
// beside AVX-512 and Zen 4 does not, so a CPU with both (Zen 5, Intel from Sapphire Rapids)
// takes Zen 5's limits.

// Per activation row: blocks of kPieceBlock values, each stored as h, then l1, then l2; for
// INT4 each piece holds the block's 64 even-k values, then its 64 odd-k values (the low and
// high nibbles of 64 packed bytes), for INT8 the block's values in order.
struct ActivationPieces {
  std::vector<int8_t, CacheLineAllocator<int8_t>> q;  // [M][K / 128][3][128]
  std::vector<float> step;                            // [M]: s
  std::vector<float> group_sums;                      // [M][groups]: sum of h + l1/254 + l2/254^2
};

constexpr float kPieceRadix = 254.0f;  // l1 and l2 count 1/254ths of the piece before them

// A group's sum of h + l1/254 + l2/254^2 from the sums of its pieces (ActivationPieces::group_sums).
inline float piece_group_sum(int64_t h, int64_t l1, int64_t l2) {
  return static_cast<float>(static_cast<double>(h) + static_cast<double>(l1) / kPieceRadix +
                            static_cast<double>(l2) / (double{kPieceRadix} * kPieceRadix));
}

// Whether the active ISA has a pieces kernel for fmt at this K and group (gsize = min(group,
// K)): K a multiple of kPieceBlock and of gsize; AVX-512 on a CPU with VNNI, INT4 or INT8; AVX2,
// INT4; groups of whole blocks, and for INT4 also of 32 or 64.
bool pieces_kernel_takes(Format fmt, int64_t K, int64_t gsize);

// Whether linear_weight_only runs it: the kernels switched on (set_activation_pieces_enabled,
// tensorslim/gemm.h), a kernel that takes the problem, and the rows where it gains: INT4 batch
// 1, and pieces_rows(fmt) rows from K = kPieceMinKForRows.
bool pieces_fit(Format fmt, int64_t M, int64_t K, int64_t gsize);

// Splits x (float32 or bfloat16 rows) into pieces in the order fmt's kernel reads (INT4: each
// block's even k, then odd k; INT8: k in order). False (nothing to use) where a row holds NaN or
// Inf, or its largest magnitude is below 1e-30 but not 0 (its step would be subnormal): the
// float kernels keep those inputs' exact semantics.
bool split_activation_pieces(const TensorView& x, int64_t gsize, Format fmt, ActivationPieces& out);
bool split_activation_pieces_avx512(const TensorView& x, int64_t gsize, bool even_odd, ActivationPieces& out);
bool split_activation_pieces_avx2(const TensorView& x, int64_t gsize, ActivationPieces& out);  // INT4 order

// E2M1 weights (NVFP4 / MXFP4) take the INT4 kernel's loop with each code read as
// u = 2 * value + 12 (0..24, one byte-table lookup), 12 taken off with the pieces' group sums,
// and each group's scale decoded per tile of rows and halved.
struct Fp4Scales {
  const uint8_t* codes;  // [N, groups]: E4M3 (NVFP4) or E8M0 (MXFP4) bytes
  bool e4m3;
  float factor;  // times every decoded scale: 1/2, and NVFP4's tensor scale
};
// Whether linear_lowbit runs them: the switch on, AVX-512 VNNI, K a multiple of 128, the
// format's own group (16 / 32), batch 1, or up to pieces_rows(fmt).most rows from K = 1024. Against the
// E2M1 float GEMV (Zen 4, random-order rounds): batch 1 1.40-1.48x at 4096-11008 wide weights,
// 1.0-1.26x at 384-2048; 2-32 rows at K = 1024-4096 1.08-1.25x (NVFP4), 1.18-1.39x (MXFP4); at
// K = 384-768 0.76-1.18x. An AVX2 version (vpmaddubsw, groups as half-block lanes) ran batch 1
// at 0.79-1.03x the AVX2 E2M1 GEMV (each 128 values' six group scalings and the scale decode
// outweighed the cheaper products): not kept.
constexpr int64_t kFp4PieceMinKForRows = 1024;
bool fp4_pieces_fit(Format fmt, int64_t M, int64_t K, int64_t group);
// out[0, n) = the n scale bytes decoded (exactly as e4m3_decode / e8m0_decode) times s.factor.
void fp4_decode_scales_avx512(const uint8_t* codes, int64_t n, const Fp4Scales& s, float* out);
// p as for linear_pieces, its scales unread (s instead); a split with p.gsize (16 or 32).
void linear_fp4_pieces_avx512(const WeightOnlyProblem& p, const ActivationPieces& a, const Fp4Scales& s, int64_t M);

// out = x @ dequantize(qweight)^T + bias for the integer formats (int4 / uint4 / int8 / uint8).
void linear_pieces(const WeightOnlyProblem& p, const ActivationPieces& a, Format fmt, int64_t M);
void linear_pieces_avx512(const WeightOnlyProblem& p, const ActivationPieces& a, Format fmt, int64_t M);
void linear_pieces_avx2(const WeightOnlyProblem& p, const ActivationPieces& a, Format fmt, int64_t M);  // INT4

}  // namespace cpu
}  // namespace tensorslim
