// linear_lowbit on the CPU: argument checks, the scalar reference, and the choice
// between the fused AVX-512 / AVX2 decode GEMV (small batch) and, above it, decode-once +
// our panel GEMM (AVX2; AVX-512 for small weights) or oneDNN's sgemm (AVX-512).
#include <algorithm>
#include <string>
#include <vector>

#include "activation_pieces.h"
#include "fp4_gemv.h"
#include "onednn_usable.h"
#include "panel_gemm.h"
#include "parallel.h"
#include "tensorslim/lowbit.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace {

int64_t check_linear_lowbit_args(const TensorView& x, const TensorView& qweight,
                                 const TensorView& scales, const TensorView* zero_points,
                                 const TensorView* tensor_scale, const TensorView* bias,
                                 Format fmt, int64_t group_size, const TensorView& out,
                                 const TensorView* workspace) {
  for (const TensorView* t : {&x, &qweight, &scales, &out})
    TS_CHECK_VALUE(t->device == DeviceType::kCPU, "linear_lowbit: tensors are not on the CPU");
  check_ndim(x, 2, "x");
  check_ndim(qweight, 2, "qweight");
  check_dtype(x, DType::kFloat32, "x");
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  TS_CHECK_VALUE(x.strides[1] == 1 || K <= 1, "x: rows must be contiguous");
  TS_CHECK_VALUE(group_size != -1, "linear_lowbit: per-tensor weight scales are not supported");
  // The weight is a [N, K] matrix quantized row by row: reuse the quantize checks.
  const TensorView w = weight_stand_in(x, N, K);
  const int64_t groups =
      check_lowbit_args(w, fmt, group_size, qweight, scales, zero_points, tensor_scale);
  check_linear_out(out, DType::kFloat32, M, N, bias);
  if (workspace) {
    check_dtype(*workspace, DType::kFloat32, "workspace");
    check_ndim(*workspace, 2, "workspace");
    TS_CHECK_VALUE(workspace->shape[1] == K && workspace->shape[0] >= 1 &&
                       (workspace->shape[0] <= N || N == 0),
                   "workspace: expected [rows, " + std::to_string(K) + "] with 1 <= rows <= " +
                       std::to_string(N) + ", got " + shape_str(*workspace));
    check_contiguous(*workspace, "workspace");
  }
  return groups;
}

void reference(const float* x, int64_t ldx, int64_t M, const cpu::LowbitWeight& w, int64_t K,
               int64_t N, const float* bias, float* out, int64_t ldo) {
  cpu::parallel_for(N, 1, [&](int64_t b, int64_t e) {
    std::vector<float> wrow(K);
    for (int64_t n = b; n < e; ++n) {
      cpu::dequantize_row_reference(w, n, K, wrow.data());
      for (int64_t m = 0; m < M; ++m) {
        double acc = bias ? bias[n] : 0.0;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(x[m * ldx + k]) * wrow[k];
        out[m * ldo + n] = static_cast<float>(acc);
      }
    }
  });
}

// Larger batches on the scalar path: decode `rows_per_tile` weight rows at a time into `ws`
// (once per call, not once per activation row) and multiply each tile with oneDNN's sgemm.
void decode_then_sgemm(const float* x, int64_t ldx, int64_t M, const cpu::LowbitWeight& w,
                       int64_t K, int64_t N, const float* bias, float* out, int64_t ldo,
                       float* ws, int64_t rows_per_tile) {
  for (int64_t n0 = 0; n0 < N; n0 += rows_per_tile) {
    const int64_t rows = std::min(rows_per_tile, N - n0);
    cpu::parallel_for(rows, 4, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) cpu::dequantize_row_reference(w, n0 + j, K, ws + j * K);
    });
    cpu::sgemm_nt_onednn(M, rows, K, x, ldx, ws, K, out + n0, ldo);
  }
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * ldo + n] += bias[n];
}

}  // namespace

namespace cpu {

int lowbit_native_lanes() {
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  switch (active_isa()) {
    case Isa::kAVX512: return 16;
    case Isa::kAVX2: return 8;
    default: return 0;
  }
#else
  return 0;
#endif
}

// Every group must start on a whole vector step (decoders read a step from its first code);
// a row's values past its last whole step are the kernels' scalar tail, so K is free.
bool lowbit_lanes_fit(int lanes, int64_t K, int64_t group) {
  return lanes > 0 && (group >= K || group % lanes == 0);
}

bool linear_lowbit_native_fits(const FormatInfo& info, int64_t K, int64_t group) {
  (void)info;
  return lowbit_lanes_fit(lowbit_native_lanes(), K, group);
}

void dequantize_row_native(int lanes, const LowbitWeight& w, int64_t n, int64_t K, float* out) {
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (lanes == 16) return dequantize_row_avx512(w, n, K, out);
  if (lanes == 8) return dequantize_row_avx2(w, n, K, out);
#endif
  dequantize_row_reference(w, n, K, out);
}

}  // namespace cpu

int64_t lowbit_gemv_max_rows() { return kLowbitGemvMaxRows; }

void linear_lowbit(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                   const TensorView* zero_points, const TensorView* tensor_scale,
                   const TensorView* bias, Format fmt, int64_t group_size, const TensorView& out,
                   const TensorView* workspace, GemmBackend backend) {
  const int64_t groups = check_linear_lowbit_args(x, qweight, scales, zero_points, tensor_scale,
                                                  bias, fmt, group_size, out, workspace);
  TS_CHECK_VALUE(backend == GemmBackend::kAuto || backend == GemmBackend::kReference ||
                     backend == GemmBackend::kNative,
                 "linear_lowbit: backend must be auto, reference or native");
  const FormatInfo& info = format_info(fmt);
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  const cpu::LowbitWeight w{&info,
                            qweight.ptr<uint8_t>(),
                            qweight.strides[0],
                            scales.data,
                            zero_points ? zero_points->ptr<uint8_t>() : nullptr,
                            tensor_scale ? tensor_scale->ptr<float>()[0] : 1.0f,
                            groups,
                            values_per_group(K, group_size),
                            groups};
  // One read of the ISA: the step the kernel is chosen for is the one it runs with.
  const int isa_lanes = cpu::lowbit_native_lanes();
  const int lanes = cpu::lowbit_lanes_fit(isa_lanes, K, w.group) ? isa_lanes : 0;
  TS_CHECK_VALUE(backend != GemmBackend::kNative || lanes,
                 std::string("linear_lowbit: no native kernel for ") + info.name + " with K=" +
                     std::to_string(K) + ", group " + std::to_string(w.group) +
                     " (needs AVX2 or AVX-512, and one group per row or a group that is a "
                     "multiple of " + std::to_string(isa_lanes ? isa_lanes : 8) + ")");
  const float* xp = x.ptr<float>();
  float* op = out.ptr<float>();
  const float* bp = bias ? bias->ptr<float>() : nullptr;
  if (M == 0 || N == 0) return;
  if (backend == GemmBackend::kReference) {
    reference(xp, x.strides[0], M, w, K, N, bp, op, out.strides[0]);
  } else if (lanes && M > kLowbitGemvMaxRows &&
             (K * N <= cpu::kPanelSmallWeight || !cpu::fp4_pieces_fit(fmt, M, K, w.group))) {
    // Past the GEMV's rows (and the FP4 pieces' on large weights): our panel GEMM, which runs
    // on torch's threads; oneDNN's sgemm runs on its own runtime's, which contend with
    // torch's inside a model (kLowbitGemvMaxRows, docs/benchmarks.md). A small weight (MiniLM's)
    // takes it from 9 rows even where the pieces fit (384 x 1536 nvfp4 at 24 rows: 811 us in
    // the GEMV, 575 us for INT4 on the panel GEMM; Sapphire Rapids).
    cpu::PanelGemmProblem p;
    p.x = xp;
    p.ldx = x.strides[0];
    p.M = M;
    p.N = N;
    p.K = K;
    p.decode = [&](int64_t n0, int64_t rows, int64_t, int64_t, float* dst) {  // whole rows
      for (int64_t r = 0; r < rows; ++r) cpu::dequantize_row_native(lanes, w, n0 + r, K, dst + r * K);
    };
    p.bias = bp;
    p.out = op;
    p.ldo = out.strides[0];
    p.out_bf16 = false;
    cpu::panel_gemm(p);
  } else if (lanes == 0 && workspace && M > lowbit_gemv_max_rows() && cpu::onednn_usable()) {
    decode_then_sgemm(xp, x.strides[0], M, w, K, N, bp, op, out.strides[0],
                      workspace->ptr<float>(), workspace->shape[0]);
  } else if (lanes) {
    // NVFP4 / MXFP4 at a few rows on AVX-512 VNNI: integer products with the activations as
    // three int8 pieces (activation_pieces.h), where every row splits.
    if (cpu::fp4_pieces_fit(fmt, M, K, w.group)) {
      thread_local cpu::ActivationPieces pieces;
      if (cpu::split_activation_pieces(x, w.group, fmt, pieces)) {
        const cpu::WeightOnlyProblem p{qweight, scales, nullptr, bias, out, K, w.group, w.groups, nullptr};
        const bool nv = fmt == Format::kNVFP4;
        const cpu::Fp4Scales s{static_cast<const uint8_t*>(w.scales), nv, 0.5f * (nv ? w.tensor_scale : 1.0f)};
        cpu::linear_fp4_pieces_avx512(p, pieces, s, M);
        return;
      }
    }
    // NVFP4 / MXFP4: the E2M1 GEMV on activations re-laid once (fp4_gemv.h), unless one of
    // them is out of its range. On AVX2 at one row only: at 2 to 8 rows its 2-row passes
    // measured as fast as this GEMV's 4-row ones or slower (4096 x 4096, Zen 4 capped at
    // AVX2, 8 rows: nvfp4 7.8 ms against 5.0), at 1 row 1.2-1.3x faster.
    std::vector<float> fp4_x;
    if (cpu::fp4_gemv_fits(info, K, w.group, lanes) && (lanes == 16 || M == 1)) {
      fp4_x.resize(static_cast<size_t>(M * K));
      if (!cpu::pack_fp4_activations(xp, x.strides[0], M, K, lanes, fp4_x.data())) fp4_x.clear();
    }
    const cpu::Fp4Acts fp4_acts{fp4_x.data(), M, K};
    const int64_t blocks = (N + 3) / 4;  // the GEMV decodes four weight rows at a time
    cpu::parallel_for(blocks, 1, [&](int64_t b, int64_t e) {
      const int64_t n0 = b * 4, n1 = std::min(N, e * 4);
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
      if (!fp4_x.empty() && lanes == 16)
        cpu::linear_fp4_avx512(fp4_acts, w, bp, op, out.strides[0], n0, n1);
      else if (!fp4_x.empty())
        cpu::linear_fp4_avx2(fp4_acts, w, bp, op, out.strides[0], n0, n1);
      else if (lanes == 16)
        cpu::linear_lowbit_avx512(xp, x.strides[0], M, w, K, bp, op, out.strides[0], n0, n1);
      else
        cpu::linear_lowbit_avx2(xp, x.strides[0], M, w, K, bp, op, out.strides[0], n0, n1);
#else
      (void)n0, (void)n1;
#endif
    });
  } else {
    reference(xp, x.strides[0], M, w, K, N, bp, op, out.strides[0]);
  }
}

}  // namespace tensorslim
