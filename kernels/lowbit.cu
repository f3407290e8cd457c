// CUDA decoding of every low-bit format of the table (FP8, NVFP4, MXFP4, N-bit integers,
// binary, ternary): codes are read from the packed bit stream and decoded in registers with
// the same fp32 operations as the CPU reference (built with --fmad=false), so dequantized
// values match the CPU bit for bit. The GEMV gives each output column to one warp.
#include <cstdint>
#include <string>

#include "common.cuh"
#include "tensorslim/lowbit.h"
#include "tensorslim/lowbit_cuda.h"

namespace tensorslim {
namespace cuda {
namespace {

enum Kind : int { kSignedInt, kUnsignedInt, kE4M3, kE5M2, kNVFP4, kMXFP4, kBinary, kTernary };

__constant__ float kE2M1Magnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
__constant__ float kTernaryValue[4] = {0.0f, 1.0f, 0.0f, -1.0f};

struct Weight {
  const uint8_t* q;
  int64_t q_stride;  // bytes per row
  const void* scales;
  const uint8_t* zero_points;
  const float* tensor_scale;  // device pointer, NVFP4 only
  int64_t scale_stride;       // scales per row (0: one per tensor)
  int64_t group;
  int bits;
  int kind;
};

__device__ __forceinline__ uint32_t read_code(const uint8_t* row, int64_t k, int bits) {
  const int64_t pos = k * bits;
  uint32_t v = row[pos >> 3];
  if ((pos & 7) + bits > 8) v |= static_cast<uint32_t>(row[(pos >> 3) + 1]) << 8;
  return (v >> (pos & 7)) & ((1u << bits) - 1);
}

// The 7-bit magnitude shifted into the fp32 exponent/mantissa fields is the value times
// 2^-(127 - bias), for normals and subnormals alike (denormals are kept without fast math).
__device__ __forceinline__ float fp8_value(uint32_t c, bool e4m3) {
  const uint32_t mag = c & 0x7F;
  float v;
  if (e4m3)
    v = mag == 0x7F ? __int_as_float(0x7FC00000) : __int_as_float(mag << 20) * 0x1p120f;
  else if (mag >= 0x7C)
    v = mag == 0x7C ? __int_as_float(0x7F800000) : __int_as_float(0x7FC00000);
  else
    v = __int_as_float(mag << 21) * 0x1p112f;
  return (c & 0x80) ? -v : v;
}

__device__ __forceinline__ float e2m1_value(uint32_t c) {
  const float m = kE2M1Magnitude[c & 7];
  return (c & 8) ? -m : m;
}

__device__ __forceinline__ float e8m0_value(uint32_t c) {
  return c == 0 ? __int_as_float(0x00400000) : (c == 255 ? __int_as_float(0x7FC00000) : __int_as_float(c << 23));
}

__device__ __forceinline__ float decode(const Weight& w, int64_t n, int64_t k) {
  const uint32_t c = read_code(w.q + n * w.q_stride, k, w.bits);
  const int64_t idx = n * w.scale_stride + k / w.group;
  const float* fs = static_cast<const float*>(w.scales);
  const uint8_t* bs = static_cast<const uint8_t*>(w.scales);
  switch (w.kind) {
    case kSignedInt: {
      const int32_t s = static_cast<int32_t>(c << (32 - w.bits)) >> (32 - w.bits);
      return __fmul_rn(static_cast<float>(s), fs[idx]);
    }
    case kUnsignedInt:
      return __fmul_rn(static_cast<float>(static_cast<int32_t>(c) - w.zero_points[idx]), fs[idx]);
    case kE4M3: return __fmul_rn(fp8_value(c, true), fs[idx]);
    case kE5M2: return __fmul_rn(fp8_value(c, false), fs[idx]);
    case kNVFP4: return __fmul_rn(__fmul_rn(e2m1_value(c), fp8_value(bs[idx], true)), *w.tensor_scale);
    case kMXFP4: return __fmul_rn(e2m1_value(c), e8m0_value(bs[idx]));
    case kBinary: return c ? fs[idx] : -fs[idx];
    default: return __fmul_rn(kTernaryValue[c & 3], fs[idx]);
  }
}

__global__ void dequantize_kernel(Weight w, int64_t rows, int64_t cols, float* out, int64_t os0) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[r * os0 + c] = decode(w, r, c);
  }
}

constexpr int kMaxRows = 8;
constexpr int kWarpsPerBlock = 8;

// One warp per output column n: lanes stride over K, decode, and accumulate up to 8 rows.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_kernel(Weight w, const float* x, int64_t xs0, int M, int64_t K, int64_t N, const float* bias,
                float* out, int64_t os0) {
  const int64_t n = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const float v = decode(w, n, k);
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m)
      if (m < M) acc[m] = __fadd_rn(acc[m], __fmul_rn(x[m * xs0 + k], v));
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    float s = acc[m];
    for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xFFFFFFFFu, s, off);
    if (lane == 0 && m < M) out[m * os0 + n] = s + (bias ? bias[n] : 0.0f);
  }
}

int kind_of(const FormatInfo& f) {
  switch (f.format) {
    case Format::kFP8E4M3: return kE4M3;
    case Format::kFP8E5M2: return kE5M2;
    case Format::kNVFP4: return kNVFP4;
    case Format::kMXFP4: return kMXFP4;
    case Format::kBinary: return kBinary;
    case Format::kTernary: return kTernary;
    default: return f.has_zero_point ? kUnsignedInt : kSignedInt;
  }
}

Weight make_weight(const FormatInfo& f, const TensorView& q, const TensorView& scales,
                   const TensorView* zero_points, const TensorView* tensor_scale, int64_t cols,
                   int64_t group_size, int64_t groups) {
  return Weight{q.ptr<uint8_t>(),
                q.strides[0],
                scales.data,
                zero_points ? zero_points->ptr<uint8_t>() : nullptr,
                tensor_scale ? tensor_scale->ptr<float>() : nullptr,
                group_size == -1 ? 0 : groups,
                values_per_group(cols, group_size),
                f.bits,
                kind_of(f)};
}

}  // namespace

void dequantize_lowbit(const TensorView& q, const TensorView& scales,
                       const TensorView* zero_points, const TensorView* tensor_scale, Format fmt,
                       int64_t group_size, const TensorView& out) {
  check_cuda_views("dequantize_lowbit", {{&q, "q"}, {&scales, "scales"}, {zero_points, "zero_points"},
                                         {tensor_scale, "tensor_scale"}, {&out, "out"}});
  check_dtype(out, DType::kFloat32, "out");
  const int64_t groups = check_lowbit_args(out, fmt, group_size, q, scales, zero_points, tensor_scale);
  TS_CHECK_VALUE(out.strides[1] == 1 || out.shape[1] <= 1, "out: rows must be contiguous");
  const int64_t rows = out.shape[0], cols = out.shape[1];
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(out.device_index);
  const Weight w = make_weight(format_info(fmt), q, scales, zero_points, tensor_scale, cols, group_size, groups);
  const int64_t blocks = (rows * cols + 255) / 256, cap = 32LL * sm_count(out.device_index);
  dequantize_kernel<<<static_cast<int>(blocks < cap ? blocks : cap), 256, 0, stream_of(out)>>>(
      w, rows, cols, out.ptr<float>(), out.strides[0]);
  TS_CUDA_CHECK_LAUNCH("dequantize_kernel");
}

void linear_lowbit(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                   const TensorView* zero_points, const TensorView* tensor_scale,
                   const TensorView* bias, Format fmt, int64_t group_size, const TensorView& out) {
  check_cuda_views("linear_lowbit", {{&x, "x"}, {&qweight, "qweight"}, {&scales, "scales"},
                                     {zero_points, "zero_points"}, {tensor_scale, "tensor_scale"},
                                     {bias, "bias"}, {&out, "out"}});
  check_ndim(x, 2, "x");
  check_dtype(x, DType::kFloat32, "x");
  check_dtype(out, DType::kFloat32, "out");
  TS_CHECK_VALUE(group_size != -1, "linear_lowbit: per-tensor weight scales are not supported");
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  TS_CHECK_VALUE(x.strides[1] == 1 || K <= 1, "x: rows must be contiguous");
  TensorView wv = x;  // the weight's [N, K] shape for the shared checks
  wv.shape[0] = N, wv.shape[1] = K, wv.strides[0] = K, wv.strides[1] = 1;
  const int64_t groups = check_lowbit_args(wv, fmt, group_size, qweight, scales, zero_points, tensor_scale);
  check_shape2(out, M, N, "out");
  TS_CHECK_VALUE(out.strides[1] == 1 || N <= 1, "out: rows must be contiguous");
  if (bias) {
    check_dtype(*bias, DType::kFloat32, "bias");
    TS_CHECK_VALUE(bias->ndim == 1 && bias->shape[0] == N, "bias: expected shape [" + std::to_string(N) + "]");
  }
  if (M == 0 || N == 0) return;
  DeviceGuard guard(x.device_index);
  const Weight w = make_weight(format_info(fmt), qweight, scales, zero_points, tensor_scale, K, group_size, groups);
  const int blocks = static_cast<int>((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int rows = static_cast<int>(M - m0 < kMaxRows ? M - m0 : kMaxRows);
    gemv_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream_of(x)>>>(
        w, x.ptr<float>() + m0 * x.strides[0], x.strides[0], rows, K, N,
        bias ? bias->ptr<float>() : nullptr, out.ptr<float>() + m0 * out.strides[0], out.strides[0]);
    TS_CUDA_CHECK_LAUNCH("gemv_kernel");
  }
}

}  // namespace cuda
}  // namespace tensorslim
