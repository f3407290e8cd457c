// Helpers shared by the CUDA kernels: error checks, device selection, dtype loads
// and stores, and the IEEE fp32 operations the bit-exact encodings rely on.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "tensorslim/status.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace cuda {
namespace detail {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what) {
  throw RuntimeError(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace detail

#define TS_CUDA_CHECK(expr)                                                       \
  do {                                                                            \
    cudaError_t ts_err_ = (expr);                                                 \
    if (ts_err_ != cudaSuccess) ::tensorslim::cuda::detail::throw_cuda(ts_err_, #expr); \
  } while (0)

// After a <<<>>> launch: configuration errors surface here, not at the next sync.
#define TS_CUDA_CHECK_LAUNCH(name)                                                \
  do {                                                                            \
    cudaError_t ts_err_ = cudaGetLastError();                                     \
    if (ts_err_ != cudaSuccess) ::tensorslim::cuda::detail::throw_cuda(ts_err_, "launch of " name); \
  } while (0)

// Makes `device` current for the scope: the caller's thread may have another one
// selected, and launches go to the current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    TS_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device_) TS_CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

inline cudaStream_t stream_of(const TensorView& t) { return static_cast<cudaStream_t>(t.stream); }

inline int sm_count(int device) {
  int n = 0;
  TS_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n > 0 ? n : 1;
}

// Every tensor of a call must be a CUDA tensor on the first one's device.
using NamedView = std::pair<const TensorView*, const char*>;
inline void check_cuda_views(const char* op, std::initializer_list<NamedView> views) {
  const TensorView* first = nullptr;
  for (const auto& v : views) {
    if (!v.first) continue;
    TS_CHECK_VALUE(v.first->device == DeviceType::kCUDA,
                   std::string(op) + ": " + v.second + " is not a CUDA tensor");
    if (!first) first = v.first;
    TS_CHECK_VALUE(v.first->device_index == first->device_index,
                   std::string(op) + ": " + v.second + " is on cuda:" +
                       std::to_string(v.first->device_index) + ", expected cuda:" +
                       std::to_string(first->device_index));
  }
}

// The integer code at column k of a packed row (8-bit, or 4-bit low nibble first).
__device__ __forceinline__ int unpack_code(const uint8_t* row, int64_t k, int bits, bool is_signed) {
  if (bits == 8) return is_signed ? static_cast<int>(static_cast<int8_t>(row[k])) : row[k];
  const uint32_t byte = row[k >> 1];
  const uint32_t nib = (k & 1) ? byte >> 4 : byte & 0xfu;
  return is_signed ? static_cast<int>(nib ^ 8u) - 8 : static_cast<int>(nib);
}

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// ---- IEEE fp32 without FTZ or contraction, whatever flags the build uses (-ftz,
// --use_fast_math would otherwise change the rounding of subnormals and fuse ops).
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// min/max ignore a NaN operand, like std::fmin / std::fmax.
__device__ __forceinline__ float fmin_exact(float a, float b) {
  float r;
  asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fmax_exact(float a, float b) {
  float r;
  asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// Round half to even (std::nearbyint in the default rounding mode).
__device__ __forceinline__ float rint_exact(float a) {
  float r;
  asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
// Index division: 32-bit hardware-friendly when both fit (64-bit division is a long
// software routine on the GPU).
__device__ __forceinline__ int64_t div_index(int64_t a, int64_t b) {
  if (((a | b) >> 31) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// Sign flip and "> 0" on the bits, so FTZ builds cannot flush a subnormal.
__device__ __forceinline__ float neg_exact(float v) {
  return __uint_as_float(__float_as_uint(v) ^ 0x80000000u);
}
__device__ __forceinline__ bool positive_exact(float v) {  // 0 < v <= +inf
  return __float_as_uint(v) - 1u < 0x7f800000u;
}

__device__ __forceinline__ bool is_finite_bits(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

// ---- dtype tags: the element type in memory and exact widening to fp32.
struct F32 {
  using T = float;
  __device__ __forceinline__ static float load(const float* p) { return *p; }
  __device__ __forceinline__ static float to_f32(float v) { return v; }
  __device__ __forceinline__ static float from_f32(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  __device__ __forceinline__ static float to_f32(uint16_t h) {
    float r;  // exact: every fp16 value, subnormals included, is a normal fp32
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
  }
  __device__ __forceinline__ static float load(const uint16_t* p) { return to_f32(*p); }
  __device__ __forceinline__ static uint16_t from_f32(float v) {
    const uint32_t u = __float_as_uint(v);  // NaN as the CPU's float_to_f16 writes it
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7e00u);
    uint16_t h;  // round to nearest even, fp16 subnormals kept
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};
struct BF16 {
  using T = uint16_t;
  __device__ __forceinline__ static float to_f32(uint16_t h) {
    return __uint_as_float(static_cast<uint32_t>(h) << 16);
  }
  __device__ __forceinline__ static float load(const uint16_t* p) { return to_f32(*p); }
  // Same bit arithmetic as the CPU's float_to_bf16 (round to nearest even, quiet NaN).
  __device__ __forceinline__ static uint16_t from_f32(float v) {
    uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// Calls f(tag) with the dtype tag of a float view.
template <typename Fn>
void dispatch_float(DType dt, Fn&& f) {
  switch (dt) {
    case DType::kFloat32: f(F32{}); return;
    case DType::kFloat16: f(F16{}); return;
    case DType::kBFloat16: f(BF16{}); return;
    default:
      throw TypeError(std::string("expected float32, float16 or bfloat16, got ") + dtype_name(dt));
  }
}

}  // namespace cuda
}  // namespace tensorslim
