// What the per-ISA sparse linear kernels read: one packed weight (N:M or CSR) and one
// batch. Argument checks are done by sparse.cpp before any kernel runs.
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace cpu {

struct SparseWeight {
  bool csr = false;
  DType vdtype = DType::kFloat32;  // float32, bfloat16, float16, int8 or kInt4Values (N:M only)
  const void* values = nullptr;
  const float* scales = nullptr;   // int8 and int4 only
  int64_t N = 0, K = 0;
  // N:M
  int n = 0, m = 0, b = 0;         // b = index bits
  int64_t slots = 0;               // G * n per row
  int64_t val_stride = 0;          // values per row in storage: slots, rounded up to even for int4
  int64_t idx_row_bytes = 0;
  const uint8_t* indices = nullptr;
  const uint8_t* idx_end = nullptr;  // one past the whole indices buffer (for safe 8-byte loads)
  // CSR
  const uint16_t* cols = nullptr;
  const int64_t* row_ptr = nullptr;
};

struct SparseBatch {
  const float* x = nullptr;  // [M, K], row stride ldx
  int64_t M = 0, ldx = 0;
  float* y = nullptr;        // [M, N], row stride ldy
  int64_t ldy = 0;
  const float* bias = nullptr;
  // Transposed activations for the large-batch kernel: tile t (64 rows of x) is stored at
  // xt + t * K * kTileM as [K, st] with st = the tile's width rounded up to the vector width
  // (zeros in the padding).
  const float* xt = nullptr;
  // Convolutions (sparse_conv2d, one image): column k of batch rows (output positions) i is at
  // xt[col_off[k] + i], contiguous in i (the image's input planes, docs/formats.md), so the
  // transposed kernels read tile t's column k at xt + t * kTileM + col_off[k]; and output
  // row r of batch row i is y[i * ldy + r * ldr] (y [N, M]: ldy = 1, ldr = M). A linear has
  // no col_off and ldr = 1.
  const int32_t* col_off = nullptr;
  int64_t ldr = 1;
};

constexpr int64_t kTileM = 64;  // rows of x per transposed tile

// The row-wise (small-batch) kernels read each weight byte once per call and are bound by the
// cache-line misses one core keeps in flight: with the hardware prefetcher alone a 2:4 fp32
// product moved ~60% of the bytes per second a dense fp32 GEMV moves. They prefetch each
// weight stream kPrefetchAhead bytes ahead (Sapphire Rapids, 4096 x 4096, batch 1, one thread:
// 2:4 fp32 5.1-5.2 -> 4.1-4.3 ms, bf16 3.2-3.3 -> 2.4-2.6 ms, 90% CSR 1.30-1.32 -> 1.04-1.19 ms;
// 1 to 8 KB ahead measured alike, 512 bytes too short).
constexpr int64_t kPrefetchAhead = 2048;

// N:M values stored as int4 codes, two per byte (a uint8 tensor; include/tensorslim/sparse.h).
constexpr DType kInt4Values = DType::kUInt8;

// Bytes of `count` stored values (count even for int4: every offset the kernels take is).
template <DType VT>
constexpr int64_t value_bytes(int64_t count) {
  return VT == DType::kFloat32 ? 4 * count : VT == DType::kInt8 ? count : VT == kInt4Values ? count / 2 : 2 * count;
}

// Prefetches the `bytes` bytes (one hint per cache line) kPrefetchAhead past p.
inline void prefetch_ahead(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p) + kPrefetchAhead;
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// The transposed kernels' prefetch of a row's next column block: `bytes` of values at v (one
// hint per line) and the first line of its indices / columns at idx.
inline void prefetch_block(const char* v, int64_t bytes, const void* idx) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(v + o);
  __builtin_prefetch(idx);
}

// The x window the row-wise N:M kernels read `lanes` slots from: the least of 2, 4 or 8 times
// lanes columns (one, two or four vpermt2ps on AVX-512; two, four or eight vpermps on AVX2)
// that holds every group those slots touch. A vector of slots starts at a group boundary when
// n divides lanes; otherwise it can start t slots into a group (t < n) and touches at most
// floor((t + lanes - 1) / n) + 1 groups. With m <= 8 (checked by the ops) 8 * lanes always
// holds them (1:8: lanes groups of 8).
inline int nm_window(int n, int m, int lanes) {
  const int groups = lanes % n == 0 ? lanes / n : (lanes + n - 2) / n + 1;
  const int span = groups * m;
  return span <= 2 * lanes ? 2 * lanes : span <= 4 * lanes ? 4 * lanes : 8 * lanes;
}

// The largest batch the row-wise kernels take, measured against the transposed kernels (Zen 4,
// 4096 x 4096, docs/benchmarks.md). N:M decodes once per 16 (8) entries for up to 8 (4) batch
// rows at a time and stays ahead: up to 8 rows (AVX2: 4) for 2:4 and 4:8 (x from a 32- (16-)
// column window), up to 4 for the others but 1:8, which reads 128 (AVX2 64) columns per
// vector of slots, up to 2 (AVX-512 at 4 rows: 1.45-1.47 ms row-wise, 1.39-1.42 transposed).
// CSR runs batch 1 on x as it is and batches 2..8 on x transposed once to
// [K, csr_small_stride(M)] in SparseBatch::xt (zeros past M): batch 2 reads each column's two
// values with one 64-bit load, batches 3..8 multiply one broadcast value by contiguous batch
// lanes.
inline int64_t rowwise_max_m(bool csr, bool avx512, int n, int m) {
  if (csr) return 8;
  const int lanes = avx512 ? 16 : 8, win = nm_window(n, m, lanes);
  if (win == 2 * lanes && lanes % n == 0) return avx512 ? 8 : 4;  // 2:4, 4:8
  return win == 8 * lanes ? 2 : 4;  // 1:8: 2
}
inline int csr_small_stride(int64_t M) { return M == 2 ? 2 : M <= 4 ? 4 : 8; }

// Row-wise kernels (x rows in blocks of up to 8 (AVX-512 N:M) or 4 share one decode) and the
// transposed kernels, for output rows [r0, r1). CSR kernels return true when a column index
// >= K was met (those entries are skipped, never read).
void nm_rows_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);
void nm_rows_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);
void nm_rows_t_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);
void nm_rows_t_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);
bool csr_rows_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);
bool csr_rows_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);
bool csr_rows_t_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);
bool csr_rows_t_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);

// N:M INT8 / INT4 values with m = 2n (2:4, 4:8), K a multiple of 128 and at most kNmPiecesMaxK, on
// AVX-512 VNNI + VBMI (nm_pieces_avx512.cpp): output rows [r0, r1) for all a.M batch rows, whose
// activations are xq, per batch row and 128-column block the pieces h, l1, l2 as unsigned bytes
// (ActivationPieces::q + 128), with steps the rows' steps.
void nm_rows_pieces_avx512(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq, const float* steps,
                           int64_t r0, int64_t r1);
// The same on AVX2 with a 256-bit vpdpbusd (cpu::avx2_vnni; nm_pieces_avx2.cpp): xq as above
// with each piece's 64-column halves ordered by order_pieces_for_avx2.
void nm_rows_pieces_avx2(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq, const float* steps,
                         int64_t r0, int64_t r1);
// Pieces as split_activation_pieces_avx2 writes them (per 128-column block and piece, the 64 even
// columns, then the 64 odd ones; bytes a multiple of 128) in place into nm_rows_pieces_avx2's
// order: per 64 columns c0-15, c32-47, c16-31, c48-63.
void order_pieces_for_avx2(uint8_t* q, int64_t bytes);
// A pieces kernel's output for one batch row from the three pieces' integer dot products (their
// +128 offsets taken off): h + l1 / 254 + l2 / 254^2 in double, / 16 for INT4's shifted codes.
inline float pieces_output(int64_t h, int64_t l1, int64_t l2, bool int4, float step, float scale, float bias) {
  const double dot = (static_cast<double>(h) + static_cast<double>(l1) / 254.0 +
                      static_cast<double>(l2) / (254.0 * 254.0)) / (int4 ? 16.0 : 1.0);
  return static_cast<float>(dot * step) * scale + bias;
}
// vpdpbusd sums 255 * 127 per slot into int32: K / 2 slots of 65536 columns stay below 2^31.
constexpr int64_t kNmPiecesMaxK = 65536;
// Where the pieces beat the float kernels (Intel Xeon with AMX, 2:4 INT8, docs/benchmarks.md):
// each row ends in 3 reductions per batch row, which short rows do not repay. Batch 1 at K = 384
// even (0.012 / 0.011 ms), from 768 on 1.1-1.6x faster; 2-8 rows at K = 2048 1.2-1.35x, 4096
// 1.15-1.65x, 11008 1.15-1.4x, but at K = 1024 0.85-1.15x and at 384 0.6-0.9x. Past 8 rows
// against the transposed kernels (K = 4096, 11008): 9-12 rows 1.2-1.8x, 16 even, 24-32 0.7-0.95x.
// The AVX2 kernel (the same Xeon on its AVX2 paths) by the same rule, 2:4: batch 1 1.3x at
// 384 x 1536, 1.4-1.9x at K = 1024-4096; 2-12 rows at K = 2048-4096 1.15-1.65x; where the rule
// says no (K = 384, 1024-1536 past 1 row, 13-16 rows) 0.93-1.03x. 4:8: 1.5-1.56x at batch 1
// (K = 1024, 2048), 1.08-1.4x at 2-12 rows (K = 2048), 0.99-1.01x where the rule says no.
inline bool nm_pieces_pay(int64_t M, int64_t K) { return M == 1 ? K >= 512 : M <= 12 && K >= 2048; }

// x [M, K] (row stride ldx, M <= st) transposed to [K, st] with zeros in columns M .. st - 1 for
// the small-batch CSR kernels (st = csr_small_stride(M)), which run on AVX2 and AVX-512 CPUs.
void transpose_small_avx2(const float* x, int64_t M, int64_t K, int64_t ldx, int st, float* xt);
// Columns [k0, k1) of x [M, K] (M <= st) into a transposed tile [K, st] (zeros in columns
// M .. st - 1; st a multiple of 8), for the transposed kernels (SparseBatch::xt).
void transpose_tile_avx2(const float* x, int64_t M, int64_t ldx, int64_t k0, int64_t k1, float* xt, int64_t st);

// The scalar reference (the specification of the linear), both formats.
bool sparse_rows_scalar(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1);

// Transposed tile width padded to the vector width W (8 or 16).
inline int64_t tile_stride(int64_t mt, int W) { return (mt + W - 1) / W * W; }

// The transposed kernels walk output rows in blocks of kRowBlock and the columns in blocks
// whose slice of the transposed tile (k_block * st floats) fits L1: the FMA loop reads a
// whole tile row (st floats) per stored weight, and from L2 it ran at 8.8 core cycles per
// weight at st = 64 against 5.4 from L1 (Zen 4, standalone). Column blocks are multiples of
// 128, which every N:M slot period (at most 128 columns) divides, and at most kMaxKBlock
// (the staging buffers' size, below).
constexpr int64_t kRowBlock = 32;
constexpr int64_t kMaxKBlock = 512;
inline int64_t k_block(int64_t st) {
  const int64_t kb = (int64_t{32} * 1024 / (st * 4)) / 128 * 128;
  return kb < 128 ? 128 : kb > kMaxKBlock ? kMaxKBlock : kb;
}
// The transposed kernels stage the entries of kStageRows rows of a column block (tile offsets
// and values, padded to whole vectors) before the FMA loop reads them: read back right after
// their vector stores, each chunk's entries stalled on store-to-load forwarding (a standalone
// loop with the tile slice in L1: 5.4 cycles per weight read from memory, 10.7 staged per
// chunk, 6.3 staged per row). An N:M row stages at most kMaxKBlock + 8 slots of a block,
// padded to the vector width; a CSR row with more entries in a block than that (only
// possible with columns out of order) is staged in parts.
constexpr int kStageRows = 4;
inline constexpr int64_t stage_capacity(int W) { return kMaxKBlock + 2 * W; }

}  // namespace cpu
}  // namespace tensorslim
