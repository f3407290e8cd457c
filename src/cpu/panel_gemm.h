// A GEMM whose weight is decoded on the fly, one panel of output rows at a time, for the
// batches where a product is compute-bound (the GEMV kernels re-decode the weight for every
// few activation rows; here each weight value is decoded once per call and then used by
// every activation row through a register-blocked fp32 micro-kernel).
#pragma once

#include <cstdint>
#include <functional>

namespace tensorslim {
namespace cpu {

// Weights of up to this many values (MiniLM's layers) run the panel GEMM above the GEMVs'
// rows on AVX-512 too, on torch's threads: oneDNN's kernels, on their own runtime's threads,
// contend with torch's inside a model and a small layer cannot amortize that. Larger weights
// take oneDNN there. (ops/decode_gemm.py's SMALL_WEIGHT is the same bound.)
constexpr int64_t kPanelSmallWeight = int64_t{1} << 20;

struct PanelGemmProblem {
  const float* x;  // [M, K] fp32, row stride ldx
  int64_t ldx;
  // Or bf16 activations (row stride ldx), for the AVX512-BF16 micro-kernel (panel_gemm_bf16):
  // the decoded weights are rounded to bf16 and multiplied in pairs by vdpbf16ps at twice the
  // fp32 FMA's multiply-adds per instruction. Needs decode_ranges.
  const uint16_t* x_bf16 = nullptr;
  int64_t M, N, K;
  // Writes weight rows [n0, n0 + rows), columns [k0, k0 + kc), as fp32 into dst, row-major
  // with row stride kc. Called from worker threads, on disjoint rows.
  std::function<void(int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* dst)> decode;
  // Whether decode takes column ranges (k0 a multiple of 128). Ranges let each K block of a
  // panel be decoded and packed in L2 (whole rows go through L3: 4096 x 4096 INT4 on AVX2 at
  // 12 / 32 rows ran 1.21 / 1.11x faster in blocks); without them decode is called with
  // k0 = 0, kc = K.
  bool decode_ranges = false;
  // Optional, with decode_ranges: writes rows [n0, n0 + rows) (rows <= 2 * the ISA's lanes),
  // columns [k0, k0 + kc), straight into a micro-panel's packed layout [kc][2 * lanes] (what
  // decode + pack_panel would make; columns past `rows` any finite value).
  std::function<void(int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* packed)> decode_packed;
  const float* bias;  // [N] or nullptr
  void* out;          // [M, ldo] f32, or bf16 bits when out_bf16
  int64_t ldo;
  bool out_bf16;
};

// out = x @ W^T + bias with the active ISA's micro-kernel; false when the active ISA has
// none (scalar), so the caller falls back.
bool panel_gemm(const PanelGemmProblem& p);
// Whether panel_gemm takes bf16 activations here (AVX-512 active and AVX512-BF16).
bool panel_gemm_takes_bf16();
void panel_gemm_bf16_avx512(const PanelGemmProblem& p);
void panel_gemm_avx2(const PanelGemmProblem& p);
void panel_gemm_avx512(const PanelGemmProblem& p);

}  // namespace cpu
}  // namespace tensorslim
