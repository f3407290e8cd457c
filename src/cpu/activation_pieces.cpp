// Which activation-pieces kernel runs (activation_pieces.h): the switch, the shapes each
// ISA's kernel takes, and the per-ISA entry points.
#include "activation_pieces.h"

#include <atomic>

#include "tensorslim/formats.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

std::atomic<bool> g_enabled{true};

bool use_avx512() { return active_isa() == Isa::kAVX512 && cpu_has_avx512_vnni(); }

}  // namespace

PiecesRows pieces_rows(Format fmt) {
  const bool fp4 = fmt == Format::kNVFP4 || fmt == Format::kMXFP4;
  const int bits = format_info(fmt).bits;
  if (use_avx512()) {
    if (!fp4 && bits != 4 && bits != 8) return {};
    const bool wide = cpu_has_avx_vnni();  // Zen 5 (activation_pieces.h)
    if (fp4 || bits == 4) return {1, !wide ? kPieceMaxRows : fp4 ? kPieceMaxRowsWide : kPieceMaxRowsWideInt4};
    // INT8 at one row reads as many bytes either way (both at memory speed); on Zen 5 the
    // float kernels stream large weights faster up to 8 rows (kPieceMinRowsWideInt8).
    return wide ? PiecesRows{kPieceMinRowsWideInt8, kPieceMaxRowsWide} : PiecesRows{2, kPieceMaxRows};
  }
  if (active_isa() != Isa::kAVX2 || fp4 || bits != 4) return {};  // AVX2: INT4 only
  switch (avx2_vnni()) {
    case AvxVnni::kVex: return {1, kPieceMaxRowsAvxVnni};
    case AvxVnni::kEvex: return {1, kPieceMaxRowsEvexVnni};
    default: return {1, 1};
  }
}

void set_activation_pieces_enabled(bool enabled) { g_enabled.store(enabled, std::memory_order_relaxed); }
bool activation_pieces_enabled() { return g_enabled.load(std::memory_order_relaxed); }

bool pieces_kernel_takes(Format fmt, int64_t K, int64_t gsize) {
  const int bits = format_info(fmt).bits;
  // Whole groups only: the kernels step over K / max(gsize, kPieceBlock) groups, so a short
  // last group of whole blocks (K = 4224 or 11008 with groups of 4096) was left out of the sums
  // (30-67% errors on AVX-512 at 1-4 rows, AVX2 at 1) until this check; the float kernels take it.
  if (K % kPieceBlock != 0 || gsize <= 0 || K % gsize != 0 || (bits != 4 && bits != 8)) return false;
  // INT4 groups of 32 or 64 take a block's lanes in groups (see the kernels); INT8 sums
  // lanes of both halves of a block together, so its groups are whole blocks.
  const bool takes = gsize % kPieceBlock == 0 || (bits == 4 && (gsize == 32 || gsize == 64));
  if (use_avx512()) return takes;
  return active_isa() == Isa::kAVX2 && bits == 4 && takes;
}

bool pieces_fit(Format fmt, int64_t M, int64_t K, int64_t gsize) {
  if (!g_enabled.load(std::memory_order_relaxed) || !pieces_kernel_takes(fmt, K, gsize)) return false;
  // AVX2 without vpdpbusd: INT4 at batch 1 only (vpmaddubsw's pieces were 0.76-0.98x at 2 rows).
  const PiecesRows rows = pieces_rows(fmt);
  if (M < rows.fewest || M > rows.most) return false;
  return M == 1 || K >= kPieceMinKForRows;
}

bool fp4_pieces_fit(Format fmt, int64_t M, int64_t K, int64_t group) {
  const bool fp4 = (fmt == Format::kNVFP4 && group == 16) || (fmt == Format::kMXFP4 && group == 32);
  return g_enabled.load(std::memory_order_relaxed) && fp4 && use_avx512() && K % kPieceBlock == 0 &&
         (M == 1 || (M >= 1 && M <= pieces_rows(fmt).most && K >= kFp4PieceMinKForRows));
}

bool split_activation_pieces(const TensorView& x, int64_t gsize, Format fmt, ActivationPieces& out) {
  const bool even_odd = format_info(fmt).bits == 4;
  return use_avx512() ? split_activation_pieces_avx512(x, gsize, even_odd, out)
                      : split_activation_pieces_avx2(x, gsize, out);
}

void linear_pieces(const WeightOnlyProblem& p, const ActivationPieces& a, Format fmt, int64_t M) {
  if (use_avx512())
    linear_pieces_avx512(p, a, fmt, M);
  else
    linear_pieces_avx2(p, a, fmt, M);
}

}  // namespace cpu
}  // namespace tensorslim
