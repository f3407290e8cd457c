// Which INT4 pieces kernel runs (int4_pieces.h): the switch, the shapes each ISA's kernel
// takes, and the per-ISA entry points.
#include "int4_pieces.h"

#include <atomic>

#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

std::atomic<bool> g_enabled{true};

bool use_avx512() { return active_isa() == Isa::kAVX512 && cpu_has_avx512_vnni(); }

}  // namespace

void set_int4_pieces_enabled(bool enabled) { g_enabled.store(enabled, std::memory_order_relaxed); }

bool int4_pieces_fit(int64_t M, int64_t K, int64_t gsize) {
  if (!g_enabled.load(std::memory_order_relaxed) || K % kPieceBlock != 0 || gsize % kPieceBlock != 0)
    return false;
  if (use_avx512()) return M == 1 || (M >= 1 && M <= kPieceMaxRows && K >= kPieceMinKForRows);
  if (active_isa() == Isa::kAVX2) return M == 1;
  return false;
}

bool split_activation_pieces(const TensorView& x, int64_t gsize, ActivationPieces& out) {
  return use_avx512() ? split_activation_pieces_avx512(x, gsize, out)
                      : split_activation_pieces_avx2(x, gsize, out);
}

void linear_int4_pieces(const WeightOnlyProblem& p, const ActivationPieces& a, bool is_signed,
                        int64_t M) {
  if (use_avx512())
    linear_int4_pieces_avx512(p, a, is_signed, M);
  else
    linear_int4_pieces_avx2(p, a, is_signed, M);
}

}  // namespace cpu
}  // namespace tensorslim
