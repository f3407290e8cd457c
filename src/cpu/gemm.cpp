// linear_weight_only on the CPU: argument checks, backend choice and the scalar
// reference that the native and oneDNN paths are tested against.
#include "tensorslim/gemm.h"

#include <algorithm>
#include <string>
#include <vector>

#include "activation_pieces.h"
#include "half.h"
#include "onednn_usable.h"
#include "panel_gemm.h"
#include "parallel.h"
#include "tensorslim/quantize.h"
#include "weight_only_native.h"

namespace tensorslim {
namespace {

// The rows up to which the weight-only GEMV runs; the panel GEMM (its rows-dot kernel at
// small weights) past them. 4-bit codes on AVX2 leave it from 5 rows, 8-bit small weights on
// AVX2 from 6, small weights on AVX-512 from 8: GEMV / panel GEMM, Zen 4, random-order rounds:
// AVX2 INT4 at 5 / 8 rows 4096 x 4096 1.86 / 1.65 ms and 2.62 / 2.35, 384 x 384 0.050 / 0.033
// and 0.067 / 0.040; AVX2 INT8 at 6 rows 1536 x 384 0.099 / 0.076, 384 x 1536 0.083 / 0.079
// (at 5 rows 0.97-1.51x), but 4096 x 4096 at 8 rows 2.54 / 3.04; AVX-512 at 8 rows 1.02-1.56x
// at MiniLM's shapes, at 5-6 rows 0.87-1.47x. (Larger AVX-512 weights take the activation
// pieces from 2 rows.)
int64_t gemv_max_rows(int bits, int64_t weight_values) {
  const bool small = weight_values <= cpu::kPanelSmallWeight;
  if (cpu::active_isa() == cpu::Isa::kAVX2) return bits == 4 ? 4 : small ? 5 : 8;
  return small ? 7 : 8;
}
// Rows from which large weights take oneDNN on AVX-512 under `auto` (linear_weight_only).
constexpr int64_t kOneDnnMinRows = 1024;
// Where oneDNN's weight-decompression matmul runs AMX tiles (Sapphire Rapids and later), bf16
// activations take it from 16 rows, any weight, and fp32 activations of large weights from 128
// rows (8-bit codes) / 256 (4-bit). 2-core Intel Xeon with AMX, one layer, ours / oneDNN ms:
// 4096 x 4096 bf16 INT8 at 8 / 16 / 32 / 256 rows 2.30 / 2.55, 3.07 / 2.96, 9.41 / 4.37, 49.2 /
// 9.9, INT4 at 12 / 16 2.77 / 4.17, 4.89 / 4.47; 384 x 1536 bf16 INT8 at 16 / 256 0.273 / 0.225,
// 1.86 / 0.62. fp32, four 4096 x 4096 layers + GELU (bench_layer_stack.py), x fp32, ours /
// oneDNN, INT8 at 128 / 256 / 512 rows 0.95 / 0.99, 0.91 / 0.96, 0.86 / 0.99; INT4 1.04 / 0.98,
// 0.93 / 0.92, 0.87 / 0.97 (docs/benchmarks.md, thirty-sixth session).
constexpr int64_t kAmxBf16OneDnnMinRows = 16;
constexpr int64_t kAmxFp32OneDnnMinRows8 = 128, kAmxFp32OneDnnMinRows4 = 256;

// Whether `auto` tries oneDNN before our kernels for x on a weight of this many values.
bool onednn_first(const TensorView& x, int64_t weight_values, int bits) {
  const int64_t M = x.shape[0];  // first: decode-sized calls stop here
  if (M < kAmxBf16OneDnnMinRows || cpu::active_isa() < cpu::Isa::kAVX512 || !cpu::onednn_usable()) return false;
  const bool large = weight_values > cpu::kPanelSmallWeight;
  if (cpu::onednn_weight_only_uses_amx())
    return x.dtype == DType::kBFloat16 ||
           (large && M >= (bits == 4 ? kAmxFp32OneDnnMinRows4 : kAmxFp32OneDnnMinRows8));
  return large && M >= kOneDnnMinRows;
}

float load_act(const TensorView& x, int64_t m, int64_t k) {
  const int64_t off = m * x.strides[0] + k;
  return x.dtype == DType::kFloat32 ? x.ptr<float>()[off]
                                    : cpu::bf16_to_float(x.ptr<uint16_t>()[off]);
}

}  // namespace

int64_t check_linear_args(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                          const TensorView* zero_points, const TensorView* bias, Format fmt,
                          int64_t group_size, const TensorView& out) {
  check_ndim(x, 2, "x");
  check_ndim(qweight, 2, "qweight");
  check_ndim(scales, 2, "scales");
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  TS_CHECK_TYPE(x.dtype == DType::kFloat32 || x.dtype == DType::kBFloat16 ||
                    (x.device == DeviceType::kCUDA && x.dtype == DType::kFloat16),
                std::string("x: unsupported activation dtype ") + dtype_name(x.dtype));
  TS_CHECK_VALUE(x.strides[1] == 1 || K <= 1, "x: rows must be contiguous");
  TS_CHECK_VALUE(group_size != -1, "linear_weight_only: per-tensor weight scales are not supported");
  // The weight is a [N, K] matrix quantized row by row: reuse the quantize checks with
  // a stand-in [N, K] float view.
  const TensorView w = weight_stand_in(x, N, K);
  check_quant_args(w, fmt, group_size, qweight, scales, zero_points);
  check_linear_out(out, x.dtype, M, N, bias);
  for (const TensorView* t : {&qweight, &scales, &out})
    check_same_device(x, *t, "linear_weight_only");
  return K;
}

namespace cpu {

void linear_weight_only_reference(const TensorView& x, const TensorView& qweight,
                                  const TensorView& scales, const TensorView* zero_points,
                                  const TensorView* bias, Format fmt, int64_t group_size,
                                  const TensorView& out) {
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  // Dequantize row by row with the reference kernels, accumulate in double.
  parallel_for(N, 1, [&](int64_t b, int64_t e) {
    std::vector<float> wrow(K);
    for (int64_t n = b; n < e; ++n) {
      TensorView q1 = qweight, s1 = scales, z1, o1;
      q1.data = qweight.ptr<uint8_t>() + n * qweight.strides[0];
      q1.shape[0] = 1;
      s1.data = scales.ptr<float>() + n * scales.shape[1];
      s1.shape[0] = 1;
      if (zero_points) {
        z1 = *zero_points;
        z1.data = zero_points->ptr<uint8_t>() + n * zero_points->shape[1];
        z1.shape[0] = 1;
      }
      o1 = contiguous_view2(wrow.data(), DType::kFloat32, 1, K);
      dequantize(q1, s1, zero_points ? &z1 : nullptr, fmt, group_size, o1);
      for (int64_t m = 0; m < M; ++m) {
        double acc = bias ? bias->ptr<float>()[n] : 0.0;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(load_act(x, m, k)) * wrow[k];
        const int64_t off = m * out.strides[0] + n;
        if (out.dtype == DType::kFloat32)
          out.ptr<float>()[off] = static_cast<float>(acc);
        else
          out.ptr<uint16_t>()[off] = float_to_bf16(static_cast<float>(acc));
      }
    }
  });
}

void pack_activations(const TensorView& x, bool deinterleave, AlignedFloats& xp) {
  const int64_t M = x.shape[0], K = x.shape[1];
  const int64_t whole = deinterleave ? K & ~int64_t{31} : 0;  // a short last block stays in order
  xp.resize(M * K);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xp.data() + m * K;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t at = k < whole ? (k & ~31) + ((k & 1) << 4) + ((k & 31) >> 1) : k;
      dst[at] = load_act(x, m, k);
    }
  }
}

static bool native_fits(const FormatInfo& info, int64_t K, int64_t group_size) {
  // INT4 groups after the first start on a 32-value block (the de-interleaved layout);
  // INT8 reads any group. A short last group ends in the kernels' scalar tail.
  return K > 0 && (info.bits == 8 || group_size >= K || group_size % 32 == 0);
}

// Whether linear_weight_only_native multiplies with the activation pieces (when every row splits).
static bool native_takes_pieces(Format fmt, int64_t M, int64_t K, int64_t group_size) {
  return native_fits(format_info(fmt), K, group_size) && pieces_fit(fmt, M, K, std::min(group_size, K));
}

bool linear_weight_only_native(const TensorView& x, const TensorView& qweight,
                               const TensorView& scales, const TensorView* zero_points,
                               const TensorView* bias, Format fmt, int64_t group_size,
                               const TensorView& out) {
  const Isa isa = active_isa();
  if (isa == Isa::kScalar) return false;
  const FormatInfo& info = format_info(fmt);
  const int64_t M = x.shape[0], K = x.shape[1];
  const int64_t gsize = std::min(group_size, K);
  if (native_takes_pieces(fmt, M, K, group_size)) {
    thread_local ActivationPieces pieces;
    if (split_activation_pieces(x, gsize, fmt, pieces)) {
      const WeightOnlyProblem p{qweight, scales, zero_points, bias, out, K, gsize, K / gsize, nullptr};
      linear_pieces(p, pieces, fmt, M);
      return true;
    }
  }
  // Past a few rows the float GEMV re-decodes the weight too often: decode once, then a GEMM.
  if (M > gemv_max_rows(info.bits, K * qweight.shape[0]))
    return linear_weight_only_panels(x, qweight, scales, zero_points, bias, fmt, group_size, out);
  if (!native_fits(info, K, group_size)) return false;
  thread_local AlignedFloats xp;
  pack_activations(x, info.bits == 4, xp);
  const WeightOnlyProblem p{qweight, scales, zero_points, bias, out, K, gsize, num_groups(K, gsize),
                            xp.data()};
  if (isa == Isa::kAVX512)
    linear_weight_only_avx512(p, fmt, M);
  else
    linear_weight_only_avx2(p, fmt, M);
  return true;
}

}  // namespace cpu

void linear_weight_only(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                        const TensorView* zero_points, const TensorView* bias, Format fmt,
                        int64_t group_size, const TensorView& out, GemmBackend backend) {
  TS_CHECK_VALUE(x.device == DeviceType::kCPU, "linear_weight_only: x is not on the CPU");
  check_linear_args(x, qweight, scales, zero_points, bias, fmt, group_size, out);
  if (x.shape[0] == 0 || out.shape[1] == 0) return;
  if (x.shape[1] == 0)  // an empty sum: out = bias, which the reference writes for any backend
    return cpu::linear_weight_only_reference(x, qweight, scales, zero_points, bias, fmt,
                                             group_size, out);
  switch (backend) {
    case GemmBackend::kReference:
      return cpu::linear_weight_only_reference(x, qweight, scales, zero_points, bias, fmt,
                                               group_size, out);
    case GemmBackend::kNative:
      TS_CHECK_VALUE(cpu::linear_weight_only_native(x, qweight, scales, zero_points, bias, fmt,
                                                    group_size, out),
                     "linear_weight_only: no native kernel fits this shape/ISA (needs AVX2; "
                     "INT4 group sizes a multiple of 32 unless one group spans the row)");
      return;
    case GemmBackend::kOneDNN:
      TS_CHECK_VALUE(cpu::onednn_usable(), "linear_weight_only: backend 'onednn' is not available "
                                           "(this build has no oneDNN, or the process forked after it started)");
      TS_CHECK_VALUE(cpu::linear_weight_only_onednn(x, qweight, scales, zero_points, bias, fmt,
                                                    group_size, out),
                     "linear_weight_only: oneDNN has no implementation for this format/shape");
      return;
    case GemmBackend::kAuto:
      // Our kernels (the GEMV, the activation pieces, then the panel GEMM, which decodes
      // each weight value once per call and runs on torch's threads) up to kOneDnnMinRows
      // rows; past them, weights of more than kPanelSmallWeight values on AVX-512 take
      // oneDNN's weight-decompression matmul. Its runtime's threads contend with torch's
      // inside a model: four 4096 x 4096 INT4 layers with GELU between (AVX-512, Zen 4) ran
      // on the panel GEMM 1.92 / 1.65 / 1.37 / 1.16 / 1.03x oneDNN's speed at 48 / 64 / 128 /
      // 256 / 512 rows (INT8 1.54x at 64, 1.14x at 256), on oneDNN 1.03-1.06x faster at
      // 1024 and 2048. Small weights at 64+ fp32 rows (4096+ on AMD with AVX2 / AVX-512
      // kernels) are decoded once for torch's GEMM in Python (ops/decode_gemm.py). CPUs whose
      // oneDNN runs AMX take it sooner (onednn_first).
      if (!onednn_first(x, out.shape[1] * x.shape[1], format_info(fmt).bits) &&
          cpu::linear_weight_only_native(x, qweight, scales, zero_points, bias, fmt, group_size, out))
        return;
      if (cpu::linear_weight_only_onednn(x, qweight, scales, zero_points, bias, fmt, group_size,
                                         out))
        return;
      // oneDNN declined (e.g. a short last group): our kernel takes any batch size.
      if (cpu::linear_weight_only_native(x, qweight, scales, zero_points, bias, fmt, group_size, out))
        return;
      return cpu::linear_weight_only_reference(x, qweight, scales, zero_points, bias, fmt,
                                               group_size, out);
  }
}

}  // namespace tensorslim
