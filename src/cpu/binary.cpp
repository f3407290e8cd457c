// Binary / ternary / XNOR linears on the CPU: argument checks, backend choice (by the
// active ISA) and the scalar references that the AVX-512 and AVX2 paths
// (binary_avx512.cpp, binary_avx2.cpp) are tested against.
#include "tensorslim/binary.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace {

int64_t bytes_for(int64_t K, int per_byte) { return (K + per_byte - 1) / per_byte; }

// Checks x [M, K] f32, w [N, >= bytes] uint8, scales [N] f32, bias, out [M, N] f32.
void check_args(const char* op, const TensorView& x, const TensorView& w, int per_byte,
                const TensorView& scales, const TensorView* bias, const TensorView& out) {
  const std::string o = op;
  TS_CHECK_VALUE(x.device == DeviceType::kCPU, o + ": x is not on the CPU");
  check_ndim(x, 2, "x");
  check_dtype(x, DType::kFloat32, "x");
  TS_CHECK_VALUE(x.strides[1] == 1 || x.shape[1] <= 1, o + ": x rows must be contiguous");
  const int64_t M = x.shape[0], K = x.shape[1];
  check_ndim(w, 2, "qweight");
  check_dtype(w, DType::kUInt8, "qweight");
  const int64_t N = w.shape[0];
  TS_CHECK_VALUE(w.shape[1] == bytes_for(K, per_byte),
                 o + ": qweight has " + std::to_string(w.shape[1]) + " bytes per row, expected " +
                     std::to_string(bytes_for(K, per_byte)) + " for K = " + std::to_string(K));
  TS_CHECK_VALUE(w.strides[1] == 1 || w.shape[1] <= 1, o + ": qweight rows must be contiguous");
  check_dtype(scales, DType::kFloat32, "scales");
  TS_CHECK_VALUE(scales.ndim == 1 && scales.shape[0] == N,
                 o + ": scales: expected shape [" + std::to_string(N) + "], got " + shape_str(scales));
  check_contiguous(scales, "scales");
  if (bias) {
    check_dtype(*bias, DType::kFloat32, "bias");
    TS_CHECK_VALUE(bias->ndim == 1 && bias->shape[0] == N,
                   o + ": bias: expected shape [" + std::to_string(N) + "], got " + shape_str(*bias));
    check_contiguous(*bias, "bias");
  }
  check_dtype(out, DType::kFloat32, "out");
  check_shape2(out, M, N, "out");
  TS_CHECK_VALUE(out.strides[1] == 1 || N <= 1, o + ": out rows must be contiguous");
  for (const TensorView* t : {&w, &scales, &out}) check_same_device(x, *t, op);
  if (bias) check_same_device(x, *bias, op);
}

void check_backend(const char* op, GemmBackend backend) {
  TS_CHECK_VALUE(backend != GemmBackend::kOneDNN,
                 std::string(op) + ": oneDNN has no binary/ternary kernel (use auto, native or reference)");
}

const char* kNoNative = ": no native kernel fits (needs AVX2 or AVX-512; see ts._C.best_isa())";

inline int bit_at(const uint8_t* row, int64_t k) { return (row[k >> 3] >> (k & 7)) & 1; }

// Ternary code at k as -1, 0 or +1 (0b10 is not produced by packing and reads as 0).
inline int trit_at(const uint8_t* row, int64_t k) {
  const int c = (row[k >> 2] >> (2 * (k & 3))) & 3;
  return c == 1 ? 1 : (c == 3 ? -1 : 0);
}

// y[m, n] = (sum_k weight_at(row n, k) * x[m, k]) * scale[n] + bias[n], in double: the
// reference both packed layouts (sign bits, 2-bit trits) are checked against.
template <class WeightAt>
void linear_codes_reference(const TensorView& x, const TensorView& w, const TensorView& scales,
                            const TensorView* bias, const TensorView& out, WeightAt weight_at) {
  const int64_t M = x.shape[0], K = x.shape[1], N = w.shape[0];
  cpu::parallel_for(N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* row = w.ptr<uint8_t>() + n * w.strides[0];
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x.ptr<float>() + m * x.strides[0];
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k) acc += weight_at(row, k) * static_cast<double>(xr[k]);
        double y = acc * scales.ptr<float>()[n] + (bias ? bias->ptr<float>()[n] : 0.0f);
        out.ptr<float>()[m * out.strides[0] + n] = static_cast<float>(y);
      }
    }
  });
}

}  // namespace

namespace cpu {

void linear_binary_reference(const TensorView& x, const TensorView& bits,
                             const TensorView& scales, const TensorView* bias,
                             const TensorView& out) {
  linear_codes_reference(x, bits, scales, bias, out,
                         [](const uint8_t* row, int64_t k) { return bit_at(row, k) ? 1 : -1; });
}

void linear_ternary_reference(const TensorView& x, const TensorView& codes,
                              const TensorView& scales, const TensorView* bias,
                              const TensorView& out) {
  linear_codes_reference(x, codes, scales, bias, out, trit_at);
}

void xnor_dots_reference(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                         const TensorView& dots) {
  const int64_t M = a_bits.shape[0], N = w_bits.shape[0];
  parallel_for(N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* w = w_bits.ptr<uint8_t>() + n * w_bits.strides[0];
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* a = a_bits.ptr<uint8_t>() + m * a_bits.strides[0];
        int32_t dot = 0;
        for (int64_t k = 0; k < K; ++k) dot += bit_at(a, k) == bit_at(w, k) ? 1 : -1;
        dots.ptr<int32_t>()[m * dots.strides[0] + n] = dot;
      }
    }
  });
}

}  // namespace cpu

void binarize_rows(const TensorView& x, const TensorView& bits, const TensorView& scales) {
  check_ndim(x, 2, "x");
  check_dtype(x, DType::kFloat32, "x");
  TS_CHECK_VALUE(x.strides[1] == 1 || x.shape[1] <= 1, "binarize_rows: x rows must be contiguous");
  const int64_t M = x.shape[0], K = x.shape[1];
  check_ndim(bits, 2, "bits");
  check_dtype(bits, DType::kUInt8, "bits");
  TS_CHECK_VALUE(bits.shape[0] == M && bits.shape[1] >= bytes_for(K, 8) &&
                     (bits.strides[1] == 1 || bits.shape[1] <= 1),
                 "binarize_rows: bits: expected [" + std::to_string(M) + ", >= " +
                     std::to_string(bytes_for(K, 8)) + "] with contiguous rows, got " +
                     shape_str(bits));
  check_dtype(scales, DType::kFloat32, "scales");
  TS_CHECK_VALUE(scales.ndim == 1 && scales.shape[0] == M && scales.strides[0] == 1,
                 "binarize_rows: scales: expected [" + std::to_string(M) + "], got " + shape_str(scales));
  // Rows in parallel; within a row the float64 sum runs in index order (the specification
  // the Python reference reproduces bit for bit).
  cpu::parallel_for(M, 4, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = x.ptr<float>() + m * x.strides[0];
      uint8_t* br = bits.ptr<uint8_t>() + m * bits.strides[0];
      std::memset(br, 0, bits.shape[1]);
      double sum = 0.0;
      for (int64_t k0 = 0; k0 < K; k0 += 8) {
        uint32_t byte = 0;
        for (int64_t k = k0; k < std::min<int64_t>(K, k0 + 8); ++k) {
          byte |= static_cast<uint32_t>(xr[k] >= 0.0f) << (k - k0);
          sum += std::fabs(static_cast<double>(xr[k]));
        }
        br[k0 >> 3] = static_cast<uint8_t>(byte);
      }
      scales.ptr<float>()[m] = K ? static_cast<float>(sum / static_cast<double>(K)) : 0.0f;
    }
  });
}

void xnor_dots(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
               const TensorView& dots, GemmBackend backend) {
  check_backend("xnor_dots", backend);
  for (const TensorView* t : {&a_bits, &w_bits}) {
    check_ndim(*t, 2, "bits");
    check_dtype(*t, DType::kUInt8, "bits");
    TS_CHECK_VALUE(t->shape[1] >= bytes_for(K, 8) && (t->strides[1] == 1 || t->shape[1] <= 1),
                   "xnor_dots: bit rows must hold >= ceil(K/8) contiguous bytes, got " + shape_str(*t));
  }
  check_dtype(dots, DType::kInt32, "dots");
  check_shape2(dots, a_bits.shape[0], w_bits.shape[0], "dots");
  TS_CHECK_VALUE(dots.strides[1] == 1 || dots.shape[1] <= 1, "xnor_dots: dots rows must be contiguous");
  if (dots.numel() == 0) return;
  if (backend == GemmBackend::kReference) return cpu::xnor_dots_reference(a_bits, w_bits, K, dots);
  if (cpu::xnor_dots_native(a_bits, w_bits, K, dots)) return;
  TS_CHECK_VALUE(backend == GemmBackend::kAuto, std::string("xnor_dots") + kNoNative);
  cpu::xnor_dots_reference(a_bits, w_bits, K, dots);
}

namespace {

using LinearRef = void (*)(const TensorView&, const TensorView&, const TensorView&,
                           const TensorView*, const TensorView&);
using LinearNative = bool (*)(const TensorView&, const TensorView&, const TensorView&,
                              const TensorView*, const TensorView&);

// Checks, then the reference, the native kernel, or (auto) the reference where none fits.
void run_linear(const char* op, int per_byte, LinearRef reference, LinearNative native,
                const TensorView& x, const TensorView& w, const TensorView& scales,
                const TensorView* bias, const TensorView& out, GemmBackend backend) {
  check_backend(op, backend);
  check_args(op, x, w, per_byte, scales, bias, out);
  if (out.numel() == 0) return;
  if (backend == GemmBackend::kReference) return reference(x, w, scales, bias, out);
  if (native(x, w, scales, bias, out)) return;
  TS_CHECK_VALUE(backend == GemmBackend::kAuto, std::string(op) + kNoNative);
  reference(x, w, scales, bias, out);
}

}  // namespace

void linear_binary(const TensorView& x, const TensorView& bits, const TensorView& scales,
                   const TensorView* bias, const TensorView& out, GemmBackend backend) {
  run_linear("linear_binary", 8, cpu::linear_binary_reference, cpu::linear_binary_native, x,
             bits, scales, bias, out, backend);
}

void linear_ternary(const TensorView& x, const TensorView& codes, const TensorView& scales,
                    const TensorView* bias, const TensorView& out, GemmBackend backend) {
  run_linear("linear_ternary", 4, cpu::linear_ternary_reference, cpu::linear_ternary_native, x,
             codes, scales, bias, out, backend);
}

void linear_xnor(const TensorView& x, const TensorView& bits, const TensorView& scales,
                 const TensorView* bias, const TensorView& out, GemmBackend backend) {
  check_backend("linear_xnor", backend);
  check_args("linear_xnor", x, bits, 8, scales, bias, out);
  if (out.numel() == 0) return;
  const int64_t M = x.shape[0], K = x.shape[1], N = bits.shape[0];
  // Activation bits rows are padded to 64 bytes (zeros) so vector loads stay in bounds.
  const int64_t row_bytes = (bytes_for(K, 8) + 63) / 64 * 64;
  thread_local std::vector<uint8_t> a_bits;
  thread_local std::vector<float> a_scale;
  thread_local std::vector<int32_t> dots;
  a_bits.assign(M * row_bytes, 0);
  a_scale.resize(M);
  dots.resize(M * N);
  const TensorView av = contiguous_view2(a_bits.data(), DType::kUInt8, M, row_bytes);
  TensorView sv;
  sv.data = a_scale.data();
  sv.ndim = 1;
  sv.shape[0] = M;
  sv.strides[0] = 1;
  const TensorView dv = contiguous_view2(dots.data(), DType::kInt32, M, N);
  binarize_rows(x, av, sv);
  xnor_dots(av, bits, K, dv, backend);
  // The same float arithmetic for every backend: outputs agree bit for bit.
  const float* ws = scales.ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float y = static_cast<float>(dots[m * N + n]) * a_scale[m] * ws[n];
      out.ptr<float>()[m * out.strides[0] + n] = y + (bias ? bias->ptr<float>()[n] : 0.0f);
    }
}

namespace cpu {

// Rows from which binary / ternary products run the panel GEMM (binary_panels.cpp) instead of
// the add / subtract tiles. 4096 x 4096, Zen 4, tiles / panel GEMM ms: AVX-512 binary at 32 /
// 64 / 256 rows 6.2 / 8.4, 12.1 / 13.2, 47.4 / 41.8; ternary 8.0 / 8.9, 15.8 / 14.1, 62.4 /
// 43.4; AVX2 binary 7.8 / 9.8, 22.0 / 14.4, 128.7 / 52.6; ternary 9.7 / 9.8, 19.0 / 14.7,
// 75.1 / 47.2 (fp32 47-103 ms at 256 rows: the tiles fell below it).
constexpr int64_t kBinaryPanelMinRows = 64;

bool linear_binary_native(const TensorView& x, const TensorView& bits, const TensorView& scales,
                          const TensorView* bias, const TensorView& out) {
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (x.shape[0] >= kBinaryPanelMinRows && linear_binary_panels(x, bits, scales, bias, out)) return true;
  if (active_isa() == Isa::kAVX512) return linear_binary_avx512(x, bits, scales, bias, out);
  if (active_isa() == Isa::kAVX2) return linear_binary_avx2(x, bits, scales, bias, out);
#endif
  return false;
}

bool linear_ternary_native(const TensorView& x, const TensorView& codes,
                           const TensorView& scales, const TensorView* bias,
                           const TensorView& out) {
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (x.shape[0] >= kBinaryPanelMinRows && linear_ternary_panels(x, codes, scales, bias, out)) return true;
  if (active_isa() == Isa::kAVX512) return linear_ternary_avx512(x, codes, scales, bias, out);
  if (active_isa() == Isa::kAVX2) return linear_ternary_avx2(x, codes, scales, bias, out);
#endif
  return false;
}

bool xnor_dots_native(const TensorView& a_bits, const TensorView& w_bits, int64_t K,
                      const TensorView& dots) {
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (active_isa() == Isa::kAVX512) return xnor_dots_avx512(a_bits, w_bits, K, dots);
  if (active_isa() == Isa::kAVX2) return xnor_dots_avx2(a_bits, w_bits, K, dots);
#endif
  return false;
}

}  // namespace cpu
}  // namespace tensorslim
