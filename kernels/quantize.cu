// quantize / dequantize on CUDA, bit for bit equal to the CPU reference
// (src/cpu/quantize.cpp): same group_params(), same encode/decode arithmetic, done
// with the IEEE helpers of common.cuh so no build flag can change a rounding.
//
// quantize: a "team" of lanes (a power of two up to a warp) owns one group; each lane
// reads packets of 16 bytes (4 fp32 or 8 fp16/bf16 values) when the layout allows,
// the team reduces min/max with shuffles, then encodes. Per tensor: a range pass
// (atomics on the bit patterns of -min and max), a one-thread parameter kernel, an
// encode pass. NaN/Inf set the smallest offending row in a device flag; the host
// reads it after a stream sync and throws.
#include <cmath>
#include <limits>
#include <string>
#include <unordered_map>

#include "common.cuh"
#include "tensorslim/cuda.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;
constexpr unsigned long long kNoBadRow = ~0ull;

struct FormatParams {
  float qmin, qmax, divisor;
  bool has_zp;
  int bits;
};

// Per call device state: the first row with NaN/Inf, and the per-tensor range as
// the bit patterns of -min(x, 0) and max(x, 0) (non-negative floats order like
// their bits, so atomicMax on the bits is a float max).
struct Scratch {
  unsigned long long bad_row;
  unsigned int neg_lo_bits;
  unsigned int hi_bits;
};

enum Mode : int { kGroups = 0, kRange = 1, kEncodeFixed = 2 };

struct QuantArgs {
  const void* x;
  int64_t xs0, xs1;       // element strides
  int64_t rows, groups;   // groups per row
  int64_t gsize;          // values per group (the row length per tensor / per row)
  uint8_t* q;
  int64_t qs0;
  float* scales;
  uint8_t* zps;
  FormatParams f;
  Scratch* scratch;
  int team;      // lanes per group
  bool vec_x;    // 16-byte loads: unit column stride, aligned rows, gsize % VEC == 0
  bool vec_q;    // packed codes of a packet stored in one aligned word
};

// group_params() of quantize.cpp.
__device__ __forceinline__ void group_params(const FormatParams& f, float lo, float hi,
                                             float* scale, float* zp) {
  lo = fmin_exact(lo, 0.0f);
  hi = fmax_exact(hi, 0.0f);
  if (f.has_zp) {
    float s = div_rn(sub_rn(hi, lo), f.divisor);
    s = positive_exact(s) ? s : 1.0f;
    float z = rint_exact(div_rn(neg_exact(lo), s));
    *zp = fmin_exact(fmax_exact(z, f.qmin), f.qmax);
    *scale = s;
  } else {
    const float s = div_rn(fmax_exact(neg_exact(lo), hi), f.divisor);
    *scale = positive_exact(s) ? s : 1.0f;
    *zp = 0.0f;
  }
}

// encode() of quantize_scalar.cpp: clamp(rne(x / scale) + zp, qmin, qmax).
__device__ __forceinline__ int encode(float v, float scale, float zp, const FormatParams& f) {
  float r = add_rn(rint_exact(div_rn(v, scale)), zp);
  r = fmin_exact(fmax_exact(r, f.qmin), f.qmax);
  return __float2int_rz(r);  // already integral
}

// VEC values of a group starting at value j0; values past gsize read as 0.
template <class Tag, int VEC>
__device__ __forceinline__ void load_packet(const typename Tag::T* xg, int64_t xs1, int64_t j0,
                                            int64_t gsize, bool vec, float (&v)[VEC]) {
  if (vec) {
    const uint4 raw = *reinterpret_cast<const uint4*>(xg + j0);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (VEC == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = Tag::to_f32(static_cast<uint16_t>(w[i] & 0xffffu));
        v[2 * i + 1] = Tag::to_f32(static_cast<uint16_t>(w[i] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      v[i] = j0 + i < gsize ? Tag::load(xg + (j0 + i) * xs1) : 0.0f;
  }
}

template <class Tag, int MODE>
__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantArgs a) {
  using T = typename Tag::T;
  constexpr int VEC = 16 / sizeof(T);
  const T* x = static_cast<const T*>(a.x);
  const int lane = threadIdx.x & 31;
  const int team = a.team;
  const int tl = lane & (team - 1);
  const int64_t teams_per_warp = 32 / team;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t total = a.rows * a.groups;
  const int64_t npk = (a.gsize + VEC - 1) / VEC;

  float fixed_scale = 1.0f, fixed_zp = 0.0f;
  if (MODE == kEncodeFixed) {
    if (a.scratch->bad_row != kNoBadRow) return;  // the host throws; nothing to encode
    fixed_scale = a.scales[0];
    fixed_zp = a.zps ? static_cast<float>(a.zps[0]) : 0.0f;
  }
  float run_neg_lo = 0.0f, run_hi = 0.0f;  // kRange: this lane's running range

  // The loop bound depends on the warp only, so every lane reaches the shuffles.
  for (int64_t base = warp * teams_per_warp; base < total; base += nwarps * teams_per_warp) {
    const int64_t gi = base + lane / team;
    const bool valid = gi < total;
    const int64_t r = valid ? div_index(gi, a.groups) : 0;
    const int64_t g = valid ? gi - r * a.groups : 0;
    const T* xg = x + r * a.xs0 + g * a.gsize * a.xs1;
    float scale = fixed_scale, zp = fixed_zp;
    int bad = 0;

    if (MODE != kEncodeFixed) {
      float lo = INFINITY, hi = -INFINITY;
      if (valid) {
        for (int64_t pk = tl; pk < npk; pk += team) {
          float v[VEC];
          load_packet<Tag, VEC>(xg, a.xs1, pk * VEC, a.gsize, a.vec_x, v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            if (pk * VEC + i < a.gsize) {
              bad |= !is_finite_bits(v[i]);
              lo = fmin_exact(lo, v[i]);
              hi = fmax_exact(hi, v[i]);
            }
          }
        }
      }
      for (int off = team >> 1; off > 0; off >>= 1) {
        lo = fmin_exact(lo, __shfl_xor_sync(kFull, lo, off));
        hi = fmax_exact(hi, __shfl_xor_sync(kFull, hi, off));
        bad |= __shfl_xor_sync(kFull, bad, off);
      }
      if (valid && bad && tl == 0)
        atomicMin(&a.scratch->bad_row, static_cast<unsigned long long>(r));
      if (MODE == kRange) {
        if (valid) {
          run_neg_lo = fmax_exact(run_neg_lo, neg_exact(lo));
          run_hi = fmax_exact(run_hi, hi);
        }
        continue;
      }
      group_params(a.f, lo, hi, &scale, &zp);
      if (valid && tl == 0) {
        a.scales[gi] = scale;
        if (a.zps) a.zps[gi] = static_cast<uint8_t>(static_cast<int>(zp));
      }
    }
    if (!valid || bad) continue;

    uint8_t* qg = a.q + r * a.qs0 + g * a.gsize * a.f.bits / 8;  // gsize is even for 4 bits
    for (int64_t pk = tl; pk < npk; pk += team) {
      const int64_t j0 = pk * VEC;
      float v[VEC];
      load_packet<Tag, VEC>(xg, a.xs1, j0, a.gsize, a.vec_x, v);
      int c[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) c[i] = encode(v[i], scale, zp, a.f);
      if (a.f.bits == 8) {
        if (a.vec_q) {
          uint32_t w[VEC / 4];
#pragma unroll
          for (int i = 0; i < VEC / 4; ++i)
            w[i] = (c[4 * i] & 0xff) | (c[4 * i + 1] & 0xff) << 8 | (c[4 * i + 2] & 0xff) << 16 |
                   static_cast<uint32_t>(c[4 * i + 3] & 0xff) << 24;
          if constexpr (VEC == 4) {
            *reinterpret_cast<uint32_t*>(qg + j0) = w[0];
          } else {
            *reinterpret_cast<uint2*>(qg + j0) = make_uint2(w[0], w[1]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            if (j0 + i < a.gsize) qg[j0 + i] = static_cast<uint8_t>(c[i]);
        }
      } else {
        // Two codes a byte, low nibble first; past the end (odd row) the nibble is 0.
        uint32_t b[VEC / 2];
#pragma unroll
        for (int i = 0; i < VEC / 2; ++i) {
          const uint32_t hi_nib = j0 + 2 * i + 1 < a.gsize ? (c[2 * i + 1] & 0xf) : 0u;
          b[i] = (c[2 * i] & 0xf) | hi_nib << 4;
        }
        uint8_t* dst = qg + j0 / 2;
        if (a.vec_q) {
          if constexpr (VEC == 4) {
            *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(b[0] | b[1] << 8);
          } else {
            *reinterpret_cast<uint32_t*>(dst) = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24;
          }
        } else {
#pragma unroll
          for (int i = 0; i < VEC / 2; ++i)
            if (j0 + 2 * i < a.gsize) dst[i] = static_cast<uint8_t>(b[i]);
        }
      }
    }
  }

  if (MODE == kRange) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      run_neg_lo = fmax_exact(run_neg_lo, __shfl_xor_sync(kFull, run_neg_lo, off));
      run_hi = fmax_exact(run_hi, __shfl_xor_sync(kFull, run_hi, off));
    }
    if (lane == 0) {  // clear the sign so a -0 cannot outrank a positive value
      atomicMax(&a.scratch->neg_lo_bits, __float_as_uint(run_neg_lo) & 0x7fffffffu);
      atomicMax(&a.scratch->hi_bits, __float_as_uint(run_hi) & 0x7fffffffu);
    }
  }
}

__global__ void init_scratch_kernel(Scratch* s) {
  s->bad_row = kNoBadRow;
  s->neg_lo_bits = 0;
  s->hi_bits = 0;
}

// Per tensor, between the range and encode passes.
__global__ void tensor_params_kernel(const Scratch* s, FormatParams f, float* scales,
                                     uint8_t* zps) {
  float scale, zp;
  group_params(f, neg_exact(__uint_as_float(s->neg_lo_bits)), __uint_as_float(s->hi_bits), &scale,
               &zp);
  scales[0] = scale;
  if (zps) zps[0] = static_cast<uint8_t>(static_cast<int>(zp));
}

// Per tensor on an empty tensor: the CPU writes scale 1, zero point 0.
__global__ void unit_params_kernel(float* scales, uint8_t* zps) {
  scales[0] = 1.0f;
  if (zps) zps[0] = 0;
}

// One small device buffer per host thread and device: calls from one thread are
// sequential (each syncs before returning), so they never share it in flight.
// Deliberately never freed: freeing at thread exit can run after the driver's teardown.
Scratch* thread_scratch(int device) {
  thread_local std::unordered_map<int, Scratch*> cache;
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  void* p = nullptr;
  TS_CUDA_CHECK(cudaMalloc(&p, sizeof(Scratch)));
  cache[device] = static_cast<Scratch*>(p);
  return static_cast<Scratch*>(p);
}

int grid_for(int64_t warps_needed, int device) {
  const int64_t blocks = (warps_needed + kThreads / 32 - 1) / (kThreads / 32);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * (2048 / kThreads);
  return static_cast<int>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

template <class Tag>
void launch_quantize(QuantArgs a, bool per_tensor, int device, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(typename Tag::T);
  const int64_t npk = (a.gsize + VEC - 1) / VEC;
  int team = 1;
  while (team < npk && team < 32) team <<= 1;
  a.team = team;
  const int64_t teams = a.rows * a.groups;
  const int grid = grid_for((teams + (32 / team) - 1) / (32 / team), device);
  if (!per_tensor) {
    quantize_kernel<Tag, kGroups><<<grid, kThreads, 0, stream>>>(a);
    TS_CUDA_CHECK_LAUNCH("quantize_kernel");
    return;
  }
  quantize_kernel<Tag, kRange><<<grid, kThreads, 0, stream>>>(a);
  TS_CUDA_CHECK_LAUNCH("quantize_kernel (range)");
  tensor_params_kernel<<<1, 1, 0, stream>>>(a.scratch, a.f, a.scales, a.zps);
  TS_CUDA_CHECK_LAUNCH("tensor_params_kernel");
  quantize_kernel<Tag, kEncodeFixed><<<grid, kThreads, 0, stream>>>(a);
  TS_CUDA_CHECK_LAUNCH("quantize_kernel (encode)");
}

// ---------------------------------------------------------------- dequantize

struct DequantArgs {
  const uint8_t* q;
  int64_t qs0;
  const float* scales;
  const uint8_t* zps;
  int64_t rows, cols, groups, gsize;
  bool per_tensor, is_signed;
  int bits;
  void* out;
  int64_t os0;
  bool vec;  // whole 8-value packets: aligned word loads, one group, 16-byte stores
};

constexpr int kDeqPacket = 8;

template <class Tag>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(DequantArgs a) {
  using T = typename Tag::T;
  T* out = static_cast<T*>(a.out);
  const int64_t ppr = (a.cols + kDeqPacket - 1) / kDeqPacket;
  const int64_t total = a.rows * ppr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t r = div_index(idx, ppr);
    const int64_t k0 = (idx - r * ppr) * kDeqPacket;
    const uint8_t* qr = a.q + r * a.qs0;
    T* orow = out + r * a.os0;
    int c[kDeqPacket];
    if (a.vec) {
      if (a.bits == 8) {
        const uint2 raw = *reinterpret_cast<const uint2*>(qr + k0);
#pragma unroll
        for (int i = 0; i < kDeqPacket; ++i) {
          const uint32_t byte = ((i < 4 ? raw.x : raw.y) >> (8 * (i & 3))) & 0xffu;
          c[i] = a.is_signed ? static_cast<int>(static_cast<int8_t>(byte)) : static_cast<int>(byte);
        }
      } else {
        const uint32_t raw = *reinterpret_cast<const uint32_t*>(qr + k0 / 2);
#pragma unroll
        for (int i = 0; i < kDeqPacket; ++i) {
          const uint32_t nib = (raw >> (4 * i)) & 0xfu;
          c[i] = a.is_signed ? static_cast<int>(nib ^ 8u) - 8 : static_cast<int>(nib);
        }
      }
      const int64_t gi = a.per_tensor ? 0 : r * a.groups + div_index(k0, a.gsize);
      const float scale = a.scales[gi];
      const int zp = a.zps ? a.zps[gi] : 0;
      float v[kDeqPacket];
#pragma unroll
      for (int i = 0; i < kDeqPacket; ++i) v[i] = mul_rn(static_cast<float>(c[i] - zp), scale);
      if constexpr (sizeof(T) == 4) {
        float4* dst = reinterpret_cast<float4*>(orow + k0);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          w[i] = static_cast<uint32_t>(Tag::from_f32(v[2 * i])) |
                 static_cast<uint32_t>(Tag::from_f32(v[2 * i + 1])) << 16;
        *reinterpret_cast<uint4*>(orow + k0) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kDeqPacket; ++i) {
        const int64_t k = k0 + i;
        if (k >= a.cols) break;
        const int code = unpack_code(qr, k, a.bits, a.is_signed);
        const int64_t gi = a.per_tensor ? 0 : r * a.groups + div_index(k, a.gsize);
        const int zp = a.zps ? a.zps[gi] : 0;
        orow[k] = Tag::from_f32(mul_rn(static_cast<float>(code - zp), a.scales[gi]));
      }
    }
  }
}

}  // namespace

void quantize(const TensorView& x, Format fmt, int64_t group_size, const TensorView& q,
              const TensorView& scales, const TensorView* zero_points) {
  check_cuda_views("quantize",
                   {{&x, "x"}, {&q, "q"}, {&scales, "scales"}, {zero_points, "zero_points"}});
  const int64_t groups = check_quant_args(x, fmt, group_size, q, scales, zero_points);
  const FormatInfo& info = format_info(fmt);
  const int64_t rows = x.shape[0], cols = x.shape[1];
  const bool per_tensor = group_size == -1;
  DeviceGuard guard(x.device_index);
  const cudaStream_t stream = stream_of(x);
  uint8_t* zps = zero_points ? zero_points->ptr<uint8_t>() : nullptr;

  if (per_tensor && (rows == 0 || cols == 0)) {
    unit_params_kernel<<<1, 1, 0, stream>>>(scales.ptr<float>(), zps);
    TS_CUDA_CHECK_LAUNCH("unit_params_kernel");
    return;
  }
  if (rows == 0) return;

  QuantArgs a{};
  a.x = x.data;
  a.xs0 = x.strides[0];
  a.xs1 = x.strides[1];
  a.rows = rows;
  a.groups = groups;
  a.gsize = per_tensor || groups == 0 ? cols : cols / groups;  // [rows, 0] has no groups
  a.q = q.ptr<uint8_t>();
  a.qs0 = q.strides[0];
  a.scales = scales.ptr<float>();
  a.zps = zps;
  a.f = FormatParams{static_cast<float>(info.qmin), static_cast<float>(info.qmax),
                     static_cast<float>(info.scale_divisor), info.has_zero_point, info.bits};
  const int esize = dtype_size(x.dtype);
  const int vec = 16 / esize;
  a.vec_x = (a.xs1 == 1 || cols <= 1) && a.gsize % vec == 0 && aligned(x.data, 16) &&
            (rows == 1 || (a.xs0 * esize) % 16 == 0);
  const int qword = info.bits == 8 ? vec : vec / 2;  // bytes of one packet's codes
  a.vec_q = a.vec_x && aligned(q.data, qword) && (rows == 1 || a.qs0 % qword == 0);
  if (cols <= 1) a.xs1 = 1;  // a size-1 dimension's stride is arbitrary

  Scratch* scratch = thread_scratch(x.device_index);
  a.scratch = scratch;
  init_scratch_kernel<<<1, 1, 0, stream>>>(scratch);
  TS_CUDA_CHECK_LAUNCH("init_scratch_kernel");
  dispatch_float(x.dtype, [&](auto tag) {
    launch_quantize<decltype(tag)>(a, per_tensor, x.device_index, stream);
  });

  unsigned long long bad_row = kNoBadRow;
  TS_CUDA_CHECK(cudaMemcpyAsync(&bad_row, &scratch->bad_row, sizeof(bad_row),
                                cudaMemcpyDeviceToHost, stream));
  TS_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (bad_row != kNoBadRow)
    throw ValueError("quantize: x contains NaN or Inf (row " + std::to_string(bad_row) +
                     "); quantization needs finite values");
}

void dequantize(const TensorView& q, const TensorView& scales, const TensorView* zero_points,
                Format fmt, int64_t group_size, const TensorView& out) {
  check_cuda_views("dequantize",
                   {{&q, "q"}, {&scales, "scales"}, {zero_points, "zero_points"}, {&out, "out"}});
  const int64_t groups = check_quant_args(out, fmt, group_size, q, scales, zero_points);
  TS_CHECK_VALUE(out.strides[1] == 1 || out.shape[1] <= 1, "out: rows must be contiguous");
  const FormatInfo& info = format_info(fmt);
  const int64_t rows = out.shape[0], cols = out.shape[1];
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(out.device_index);
  const cudaStream_t stream = stream_of(out);

  DequantArgs a{};
  a.q = q.ptr<uint8_t>();
  a.qs0 = q.strides[0];
  a.scales = scales.ptr<float>();
  a.zps = zero_points ? zero_points->ptr<uint8_t>() : nullptr;
  a.rows = rows;
  a.cols = cols;
  a.groups = groups;
  a.per_tensor = group_size == -1;
  a.gsize = a.per_tensor || groups == 0 ? cols : cols / groups;
  a.is_signed = !info.has_zero_point;
  a.bits = info.bits;
  a.out = out.data;
  a.os0 = out.strides[0];
  const int esize = dtype_size(out.dtype);
  const int qword = kDeqPacket * info.bits / 8;
  a.vec = cols % kDeqPacket == 0 && (a.per_tensor || a.gsize % kDeqPacket == 0) &&
          aligned(q.data, qword) && (rows == 1 || a.qs0 % qword == 0) && aligned(out.data, 16) &&
          (rows == 1 || (a.os0 * esize) % 16 == 0);

  const int64_t threads = rows * ((cols + kDeqPacket - 1) / kDeqPacket);
  const int64_t cap = static_cast<int64_t>(sm_count(out.device_index)) * (2048 / kThreads) * 4;
  int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > cap) blocks = cap;
  dispatch_float(out.dtype, [&](auto tag) {
    dequantize_kernel<decltype(tag)><<<static_cast<int>(blocks), kThreads, 0, stream>>>(a);
    TS_CUDA_CHECK_LAUNCH("dequantize_kernel");
  });
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for a query
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace tensorslim
