// The AVX2 / AVX-512 kernels' names in a build without them (ARM and other CPUs, or
// TENSORSLIM_X86_KERNELS=OFF), where active_isa() is scalar. A kernel that returns bool
// answers false, as on a CPU without its ISA ("not run here": the caller goes on to the next
// path); the header queries answer "absent". The void ones are called only after the caller
// checked the ISA: each throws if one ever runs (a dispatch bug, loud rather than wrong).
#include <string>

#include "activation_pieces.h"
#include "awq_kernels.h"
#include "fp4_gemv.h"
#include "gptq_kernels.h"
#include "int4_codes.h"
#include "panel_gemm.h"
#include "tensorslim/binary.h"
#include "sparse/sparse_kernels.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/prune.h"
#include "tensorslim/status.h"
#include "weight_only_native.h"

namespace tensorslim {
namespace cpu {
namespace {

[[noreturn]] void absent(const char* kernel) {
  throw RuntimeError(std::string(kernel) + ": this build has no x86 kernels, yet the dispatch chose one");
}

}  // namespace

// Queries: no such CPU feature or packed layout in this build.
bool int8_vnni_available() { return false; }
bool has_vpopcntdq() { return false; }
void set_vpopcntdq_enabled(bool) {}  // the switches tests use; nothing to switch here
bool w4a8_uses_vnni() { return false; }
void set_w4a8_vnni_enabled(bool) {}
bool linear_int8_avx2_packed_matches(const uint8_t*, int64_t, int64_t) { return false; }
bool linear_int8_vnni_packed_matches(const uint8_t*, int64_t, int64_t) { return false; }
bool linear_int8_avx2_packed_narrow(const uint8_t*) { return false; }
int64_t linear_int8_avx2_packed_bytes(int64_t, int64_t) { absent("linear_int8_avx2_packed_bytes"); }
int64_t linear_int8_vnni_packed_bytes(int64_t, int64_t) { absent("linear_int8_vnni_packed_bytes"); }
void linear_int8_avx2_pack(const TensorView&, const TensorView&) { absent("linear_int8_avx2_pack"); }
void linear_int8_vnni_pack(const TensorView&, const TensorView&) { absent("linear_int8_vnni_pack"); }

// INT8 activations and weights.
bool quantize_per_token_avx2(const TensorView&, const TensorView*, const TensorView&, const TensorView&) {
  return false;
}
bool quantize_per_token_avx512(const TensorView&, const TensorView*, const TensorView&, const TensorView&) {
  return false;
}
bool quantize_static_avx2(const TensorView&, const TensorView*, float, int32_t, const TensorView&) {
  return false;
}
bool quantize_static_avx512(const TensorView&, const TensorView*, float, int32_t, const TensorView&) {
  return false;
}
bool linear_int8_avx2(const TensorView&, const TensorView&, int32_t, const TensorView&, const TensorView&,
                      const TensorView*, const TensorView&) { return false; }
bool linear_int8_panels_avx2(const TensorView&, const TensorView&, int32_t, const TensorView&, const TensorView&,
                             const TensorView*, const TensorView&, const uint8_t*) { return false; }
bool linear_int8_vnni(const TensorView&, const TensorView&, int32_t, const TensorView&, const TensorView&,
                      const TensorView*, const TensorView&) { return false; }
bool linear_int8_vnni_panels(const TensorView&, const TensorView&, int32_t, const TensorView&, const TensorView&,
                             const TensorView*, const TensorView&, const uint8_t*) { return false; }

// W4A8.
bool linear_w4a8_gemv_avx2(const W4A8Args&) { return false; }
bool linear_w4a8_gemv_avx512(const W4A8Args&) { return false; }
bool linear_w4a8_packed_avx2(const W4A8Args&, const uint8_t*) { return false; }
bool linear_w4a8_packed_avx512(const W4A8Args&, const uint8_t*) { return false; }

// Weight-only and low-bit linears.
void linear_weight_only_avx2(const WeightOnlyProblem&, Format, int64_t) { absent("linear_weight_only_avx2"); }
void linear_weight_only_avx512(const WeightOnlyProblem&, Format, int64_t) { absent("linear_weight_only_avx512"); }
bool split_activation_pieces_avx2(const TensorView&, int64_t, ActivationPieces&) { return false; }
bool split_activation_pieces_avx512(const TensorView&, int64_t, bool, ActivationPieces&) { return false; }
void linear_pieces_avx2(const WeightOnlyProblem&, const ActivationPieces&, Format, int64_t) {
  absent("linear_pieces_avx2");
}
void linear_pieces_avx512(const WeightOnlyProblem&, const ActivationPieces&, Format, int64_t) {
  absent("linear_pieces_avx512");
}
void linear_fp4_pieces_avx512(const WeightOnlyProblem&, const ActivationPieces&, const Fp4Scales&, int64_t) {
  absent("linear_fp4_pieces_avx512");
}
void linear_fp4_avx2(const Fp4Acts&, const LowbitWeight&, const float*, float*, int64_t, int64_t, int64_t) {
  absent("linear_fp4_avx2");
}
void linear_fp4_avx512(const Fp4Acts&, const LowbitWeight&, const float*, float*, int64_t, int64_t, int64_t) {
  absent("linear_fp4_avx512");
}
void fp4_decode_scales_avx512(const uint8_t*, int64_t, const Fp4Scales&, float*) {
  absent("fp4_decode_scales_avx512");
}
void decode_int4_panel_avx2(const Int4PanelRows&, int64_t, int64_t, int64_t, int64_t, float*) {
  absent("decode_int4_panel_avx2");
}
void decode_int4_panel_avx512(const Int4PanelRows&, int64_t, int64_t, int64_t, int64_t, float*) {
  absent("decode_int4_panel_avx512");
}
void panel_gemm_avx2(const PanelGemmProblem&) { absent("panel_gemm_avx2"); }
void panel_gemm_avx512(const PanelGemmProblem&) { absent("panel_gemm_avx512"); }
void panel_gemm_bf16_avx512(const PanelGemmProblem&) { absent("panel_gemm_bf16_avx512"); }

// Sparse linears.
void nm_rows_avx2(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { absent("nm_rows_avx2"); }
void nm_rows_avx512(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { absent("nm_rows_avx512"); }
void nm_rows_t_avx2(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { absent("nm_rows_t_avx2"); }
void nm_rows_t_avx512(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { absent("nm_rows_t_avx512"); }
bool csr_rows_avx2(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { return false; }
bool csr_rows_avx512(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { return false; }
bool csr_rows_t_avx2(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { return false; }
bool csr_rows_t_avx512(const SparseWeight&, const SparseBatch&, int64_t, int64_t) { return false; }
void nm_rows_pieces_avx512(const SparseWeight&, const SparseBatch&, const uint8_t*, const float*, int64_t, int64_t) {
  absent("nm_rows_pieces_avx512");
}
void nm_rows_pieces_avx2(const SparseWeight&, const SparseBatch&, const uint8_t*, const float*, int64_t, int64_t) {
  absent("nm_rows_pieces_avx2");
}
void order_pieces_for_avx2(uint8_t*, int64_t) { absent("order_pieces_for_avx2"); }
void transpose_small_avx2(const float*, int64_t, int64_t, int64_t, int, float*) { absent("transpose_small_avx2"); }
void transpose_tile_avx2(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {
  absent("transpose_tile_avx2");
}

// Pruning scores, masks and histograms.
void scores_avx2(const float*, int64_t, int, float*) { absent("scores_avx2"); }
void scores_avx512(const float*, int64_t, int, float*) { absent("scores_avx512"); }
MaskCounts mask_avx2(const float*, int64_t, int, float, uint8_t*) { absent("mask_avx2"); }
MaskCounts mask_avx512(const float*, int64_t, int, float, uint8_t*) { absent("mask_avx512"); }
void hist_avx2(const float*, int64_t, const HistPass&, int32_t*) { absent("hist_avx2"); }
void hist_avx512(const float*, int64_t, const HistPass&, int32_t*) { absent("hist_avx512"); }

// GPTQ and AWQ.
void gptq_update_avx2(double*, int64_t, const double*, int64_t, const double*, int64_t, int64_t, int64_t,
                      int64_t) {
  absent("gptq_update_avx2");
}
void gptq_update_avx512(double*, int64_t, const double*, int64_t, const double*, int64_t, int64_t, int64_t,
                        int64_t) {
  absent("gptq_update_avx512");
}
void gptq_axpy_avx2(double*, const double*, double, int64_t) { absent("gptq_axpy_avx2"); }
void gptq_axpy_avx512(double*, const double*, double, int64_t) { absent("gptq_axpy_avx512"); }
void quad_forms_avx2(const float*, int64_t, int64_t, int64_t, const float*, int64_t, double*, bool) {
  absent("quad_forms_avx2");
}
void quad_forms_avx512(const float*, int64_t, int64_t, int64_t, const float*, int64_t, double*, bool) {
  absent("quad_forms_avx512");
}
void fake_quant_avx2(const float*, float*, int64_t, int32_t, int32_t, int32_t, bool, float) {
  absent("fake_quant_avx2");
}
void fake_quant_avx512(const float*, float*, int64_t, int32_t, int32_t, int32_t, bool, float) {
  absent("fake_quant_avx512");
}

}  // namespace cpu
}  // namespace tensorslim
