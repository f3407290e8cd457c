// linear_weight_only on CUDA: out[M, N] = x[M, K] @ dequantize(qweight)[N, K]^T + bias.
//
// M <= kFusedMaxRows: a fused dequantize-GEMV streams the packed weight once. Each warp
//   owns two output rows; lanes load 16-byte chunks of them (32 INT4 / 16 INT8 codes)
//   one chunk ahead, turn codes into exact floats with a byte permute into the
//   mantissa of 2^23 (no int->float conversion), and multiply against activations
//   staged as fp32 in shared memory, transposed so that a warp's float4 reads are
//   conflict-free. Accumulation is fp32, the group scale is applied once per chunk.
//   Shapes the fast kernel cannot take (K or the group not a multiple of a chunk,
//   unaligned rows) use a warp-per-row kernel that dequantizes code by code.
// M > kFusedMaxRows: with cuBLAS, the weight is dequantized into the caller's
//   workspace and cublasGemmEx multiplies with fp32 accumulation; otherwise (no cuBLAS,
//   fp32 activations with a 16-bit workspace, no workspace) a tiled fused kernel
//   dequantizes weight tiles into shared memory and accumulates in fp32.
#include <climits>
#include <string>

#include "common.cuh"
#include "tensorslim/cuda.h"
#include "tensorslim/gemm.h"

#ifdef TENSORSLIM_HAVE_CUBLAS
#include <cublas_v2.h>

#include <map>
#include <mutex>
#include <utility>
#endif

namespace tensorslim {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

struct WqArgs {
  const void* x;
  int64_t xs0;
  int M;
  int64_t K, N;
  const uint8_t* qw;
  int64_t qs0;
  const float* scales;
  const uint8_t* zps;
  int64_t G;      // groups per weight row
  int64_t gsize;  // K for per-row scales
  int gshift;     // log2(gsize) when a power of two, else -1
  bool is_signed;
  int bits;
  const float* bias;
  void* out;
  int64_t os0;
};

// Reference dequantization of weight (n, k): float(code - zp) * scale.
__device__ __forceinline__ float dequant_one(const WqArgs& a, int64_t n, int64_t k) {
  const uint8_t* qr = a.qw + n * a.qs0;
  const int code = unpack_code(qr, k, a.bits, a.is_signed);
  const int64_t gi = n * a.G + (a.gshift >= 0 ? k >> a.gshift : div_index(k, a.gsize));
  const int zp = a.zps ? a.zps[gi] : 0;
  return static_cast<float>(code - zp) * a.scales[gi];
}

template <class Tag>
__device__ __forceinline__ void store_out(const WqArgs& a, int64_t m, int64_t n, float v) {
  if (a.bias) v += a.bias[n];
  static_cast<typename Tag::T*>(a.out)[m * a.os0 + n] = Tag::from_f32(v);
}

// ---------------------------------------------------------------- fast GEMV, M <= 8

constexpr int kGemvWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kGemvWarps * kRowsPerWarp;
constexpr int kGemvSmem = 48 * 1024;  // no opt-in needed
constexpr uint32_t kMagic = 0x4B000000u;  // 2^23: a code c in its low mantissa bits reads 2^23 + c
constexpr float kMagicF = 8388608.0f;

// Four consecutive codes of a 16-byte chunk, starting at code 4 * jq, as exact floats
// (code - offset) where off = 2^23 + offset.  Signed codes were biased by the xor.
template <int BITS>
__device__ __forceinline__ void decode4(const uint4& w, int jq, uint32_t xor_mask, float off,
                                        float (&d)[4]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  if (BITS == 4) {  // 8 codes a word, code i in bits [4i, 4i + 4)
    const uint32_t word = words[jq >> 1] ^ xor_mask;
    const uint32_t lo = word & 0x0f0f0f0fu;         // even codes, one per byte
    const uint32_t hi = (word >> 4) & 0x0f0f0f0fu;  // odd codes
    const uint32_t b = (jq & 1) * 2;                // first byte of this half word
    d[0] = __uint_as_float(__byte_perm(lo, kMagic, 0x7440u | b)) - off;
    d[1] = __uint_as_float(__byte_perm(hi, kMagic, 0x7440u | b)) - off;
    d[2] = __uint_as_float(__byte_perm(lo, kMagic, 0x7440u | (b + 1))) - off;
    d[3] = __uint_as_float(__byte_perm(hi, kMagic, 0x7440u | (b + 1))) - off;
  } else {  // 4 codes a word
    const uint32_t word = words[jq] ^ xor_mask;
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = __uint_as_float(__byte_perm(word, kMagic, 0x7440u | i)) - off;
  }
}

template <class Tag, int BITS, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_fast_kernel(WqArgs a, int ct) {
  using T = typename Tag::T;
  constexpr int VPC = BITS == 4 ? 32 : 16;  // codes per 16-byte chunk
  constexpr int JQ = VPC / 4;               // float4s per chunk and activation row
  extern __shared__ float4 xs[];            // [MT][JQ][ct + 1]: chunk index fastest
  const int ctp = ct + 1;                   // +1 keeps the staging stores conflict-free
  const T* x = static_cast<const T*>(a.x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nchunks = a.K / VPC;
  const int64_t ntiles = (nchunks + ct - 1) / ct;
  const uint32_t xor_mask = a.is_signed ? (BITS == 4 ? 0x88888888u : 0x80808080u) : 0u;
  const float sym_off = kMagicF + (BITS == 4 ? 8.0f : 128.0f);
  const int64_t nrb = (a.N + kRowsPerBlock - 1) / kRowsPerBlock;

  for (int64_t rb = blockIdx.x; rb < nrb; rb += gridDim.x) {  // uniform per block
    const int64_t n0 = rb * kRowsPerBlock + warp * kRowsPerWarp;
    float acc[kRowsPerWarp][MT] = {};
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t c0 = t * ct;
      const int cn = static_cast<int>(nchunks - c0 < ct ? nchunks - c0 : ct);
      if (ntiles > 1 || rb == blockIdx.x) {  // one tile: staged once for all row blocks
        __syncthreads();
        const int vals = cn * VPC;
        float* xf = reinterpret_cast<float*>(xs);
        for (int idx = threadIdx.x; idx < MT * vals; idx += blockDim.x) {
          const int m = idx / vals, kl = idx - m * vals;
          const int c = kl / VPC, j = kl % VPC;
          const float v = m < a.M ? Tag::load(x + m * a.xs0 + c0 * VPC + kl) : 0.0f;
          xf[((m * JQ + j / 4) * ctp + c) * 4 + (j & 3)] = v;
        }
        __syncthreads();
      }

      // Chunk c's weights, scales and offsets; the next chunk's load is issued before
      // the current one is used, so two are in flight per row.
      auto fetch = [&](int c, uint4 (&w)[kRowsPerWarp], float (&s)[kRowsPerWarp],
                       float (&off)[kRowsPerWarp]) {
        const int64_t gc = c0 + c;
        const int64_t k = gc * VPC;
        const int64_t grp = a.gshift >= 0 ? (k >> a.gshift) : div_index(k, a.gsize);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int64_t n = n0 + r;
          if (n < a.N) {
            w[r] = __ldg(reinterpret_cast<const uint4*>(a.qw + n * a.qs0) + gc);
            s[r] = __ldg(a.scales + n * a.G + grp);
            off[r] = a.zps ? kMagicF + static_cast<float>(__ldg(a.zps + n * a.G + grp)) : sym_off;
          } else {
            w[r] = make_uint4(0, 0, 0, 0);
            s[r] = 0.0f;
            off[r] = 0.0f;
          }
        }
      };
      uint4 w[kRowsPerWarp];
      float s[kRowsPerWarp], off[kRowsPerWarp];
      if (lane < cn) fetch(lane, w, s, off);
      for (int c = lane; c < cn; c += 32) {
        uint4 wn[kRowsPerWarp];
        float sn[kRowsPerWarp], offn[kRowsPerWarp];
        if (c + 32 < cn) fetch(c + 32, wn, sn, offn);
        float part[kRowsPerWarp][MT] = {};
#pragma unroll
        for (int jq = 0; jq < JQ; ++jq) {
          float d[kRowsPerWarp][4];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) decode4<BITS>(w[r], jq, xor_mask, off[r], d[r]);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float4 xv = xs[(m * JQ + jq) * ctp + c];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) {
              part[r][m] = fmaf(d[r][0], xv.x, part[r][m]);
              part[r][m] = fmaf(d[r][1], xv.y, part[r][m]);
              part[r][m] = fmaf(d[r][2], xv.z, part[r][m]);
              part[r][m] = fmaf(d[r][3], xv.w, part[r][m]);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(s[r], part[r][m], acc[r][m]);
          w[r] = wn[r];
          s[r] = sn[r];
          off[r] = offn[r];
        }
      }
    }

    // Every lane ends with every sum; lane r * MT + m writes output (m, n0 + r).
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float v = acc[r][m];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
        if (lane == r * MT + m && m < a.M && n0 + r < a.N) store_out<Tag>(a, m, n0 + r, v);
      }
    }
  }
}

// ---------------------------------------------------------------- generic GEMV, M <= 8

template <class Tag>
__global__ void __launch_bounds__(256) gemv_generic_kernel(WqArgs a) {
  using T = typename Tag::T;
  const T* x = static_cast<const T*>(a.x);
  const int lane = threadIdx.x & 31;
  const int64_t wid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nw = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t n = wid; n < a.N; n += nw) {
    float acc[kFusedMaxRows] = {};
    for (int64_t k = lane; k < a.K; k += 32) {
      const float w = dequant_one(a, n, k);
#pragma unroll
      for (int m = 0; m < kFusedMaxRows; ++m)
        if (m < a.M) acc[m] = fmaf(w, Tag::load(x + m * a.xs0 + k), acc[m]);
    }
#pragma unroll
    for (int m = 0; m < kFusedMaxRows; ++m) {
      float v = acc[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
      if (lane == m && m < a.M) store_out<Tag>(a, m, n, v);
    }
  }
}

// ---------------------------------------------------------------- tiled GEMM, any M

constexpr int kBM = 64, kBN = 64, kBK = 16, kTileThreads = 256;
static_assert(kBM == kBN && kBM * kBK % kTileThreads == 0, "tile loads share one index");

// 64x64 output tile per block, 4x4 per thread; x and dequantized weight tiles are
// stored k-major in shared memory so each thread reads float4s of both.
template <class Tag>
__global__ void __launch_bounds__(kTileThreads) gemm_tiled_kernel(WqArgs a) {
  using T = typename Tag::T;
  __shared__ __align__(16) float xs[kBK][kBM + 4];
  __shared__ __align__(16) float ws[kBK][kBN + 4];
  const T* x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t mblocks = (a.M + kBM - 1) / kBM;
  for (int64_t mb = blockIdx.y; mb < mblocks; mb += gridDim.y) {
    const int64_t m0 = mb * kBM;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < a.K; k0 += kBK) {
#pragma unroll
      for (int i = 0; i < kBM * kBK / kTileThreads; ++i) {
        const int e = tid + i * kTileThreads, rr = e / kBK, kk = e % kBK;
        const int64_t m = m0 + rr, n = n0 + rr, k = k0 + kk;
        xs[kk][rr] = (m < a.M && k < a.K) ? Tag::load(x + m * a.xs0 + k) : 0.0f;
        ws[kk][rr] = (n < a.N && k < a.K) ? dequant_one(a, n, k) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 xv = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
        const float4 wv = *reinterpret_cast<const float4*>(&ws[kk][tx * 4]);
        const float xa[4] = {xv.x, xv.y, xv.z, xv.w}, wa[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xa[i], wa[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
        if (m < a.M && n < a.N) store_out<Tag>(a, m, n, acc[i][j]);
      }
  }
}

// ---------------------------------------------------------------- launchers

template <class Tag, int BITS, int MT>
void launch_fast(const WqArgs& a, int device, cudaStream_t stream) {
  constexpr int VPC = BITS == 4 ? 32 : 16;
  const int64_t chunk_bytes = static_cast<int64_t>(MT) * (VPC / 4) * 16;  // one chunk column
  int64_t ct = kGemvSmem / chunk_bytes - 1;
  ct = ct / 8 * 8;
  const int64_t nchunks = a.K / VPC;
  if (ct > nchunks) ct = nchunks;
  const size_t smem = static_cast<size_t>(chunk_bytes * (ct + 1));
  auto kernel = gemv_fast_kernel<Tag, BITS, MT>;
  int per_sm = 0;
  TS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kGemvWarps * 32, smem));
  const int64_t nrb = (a.N + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * (per_sm > 0 ? per_sm : 1);
  const int grid = static_cast<int>(nrb < cap ? nrb : cap);
  kernel<<<grid, kGemvWarps * 32, smem, stream>>>(a, static_cast<int>(ct));
  TS_CUDA_CHECK_LAUNCH("gemv_fast_kernel");
}

template <class Tag, int BITS>
void launch_fast_rows(const WqArgs& a, int device, cudaStream_t stream) {
  // Rows of x round up to 1, 2, 4 or 8; the padding rows are zeros and never stored.
  if (a.M == 1) return launch_fast<Tag, BITS, 1>(a, device, stream);
  if (a.M == 2) return launch_fast<Tag, BITS, 2>(a, device, stream);
  if (a.M <= 4) return launch_fast<Tag, BITS, 4>(a, device, stream);
  return launch_fast<Tag, BITS, 8>(a, device, stream);
}

template <class Tag>
void launch_gemv(const WqArgs& a, int device, cudaStream_t stream) {
  const int vpc = a.bits == 4 ? 32 : 16;
  const bool fast = a.K > 0 && a.K % vpc == 0 && a.gsize % vpc == 0 && a.K / vpc <= INT_MAX &&
                    aligned(a.qw, 16) && (a.N == 1 || a.qs0 % 16 == 0);
  if (fast) {
    if (a.bits == 4) return launch_fast_rows<Tag, 4>(a, device, stream);
    return launch_fast_rows<Tag, 8>(a, device, stream);
  }
  const int64_t blocks = (a.N + 7) / 8;  // 8 warps, a row each
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  gemv_generic_kernel<Tag><<<static_cast<int>(blocks < cap ? blocks : cap), 256, 0, stream>>>(a);
  TS_CUDA_CHECK_LAUNCH("gemv_generic_kernel");
}

template <class Tag>
void launch_tiled(const WqArgs& a, cudaStream_t stream) {
  const int64_t nb = (a.N + kBN - 1) / kBN, mb = (a.M + kBM - 1) / kBM;
  TS_CHECK_VALUE(nb <= INT_MAX, "linear_weight_only: too many output features");
  const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(mb < 65535 ? mb : 65535));
  gemm_tiled_kernel<Tag><<<grid, kTileThreads, 0, stream>>>(a);
  TS_CUDA_CHECK_LAUNCH("gemm_tiled_kernel");
}

#ifdef TENSORSLIM_HAVE_CUBLAS

template <class Tag>
__global__ void add_bias_kernel(void* out, int64_t os0, int64_t M, int64_t N, const float* bias) {
  using T = typename Tag::T;
  T* o = static_cast<T*>(out);
  const int64_t total = M * N, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t m = i / N, n = i - m * N;
    T* p = o + m * os0 + n;
    *p = Tag::from_f32(Tag::load(p) + bias[n]);
  }
}

std::mutex& cublas_mutex() {
  static std::mutex mu;
  return mu;
}

// One handle per (device, stream): a handle's internal workspace must not be shared
// by kernels running concurrently on different streams. Handles live until the
// process ends (destroying them at exit can run after the driver's teardown).
cublasHandle_t cublas_handle(int device, cudaStream_t stream) {
  static auto* handles = new std::map<std::pair<int, cudaStream_t>, cublasHandle_t>();
  const auto key = std::make_pair(device, stream);
  auto it = handles->find(key);
  if (it != handles->end()) return it->second;
  cublasHandle_t h = nullptr;
  const cublasStatus_t st = cublasCreate(&h);
  if (st != CUBLAS_STATUS_SUCCESS)
    throw RuntimeError(std::string("cublasCreate failed: ") + cublasGetStatusString(st));
  (*handles)[key] = h;
  return h;
}

// Dequantize into the workspace and let cuBLAS multiply. Returns false when this
// combination is not served (the caller then runs the tiled kernel).
bool linear_cublas(const WqArgs& a, const TensorView& x, const TensorView& qweight,
                   const TensorView& scales, const TensorView* zero_points, Format fmt,
                   int64_t group_size, const TensorView& out, const TensorView& ws,
                   cudaStream_t stream) {
  // fp32 activations need an fp32 workspace (a 16-bit weight would lose fp32 accuracy);
  // 16-bit activations use the 2-byte workspace as their own dtype.
  cudaDataType_t ty;
  if (x.dtype == DType::kFloat32) {
    if (ws.dtype != DType::kFloat32) return false;
    ty = CUDA_R_32F;
  } else {
    if (ws.dtype != DType::kFloat16 && ws.dtype != DType::kBFloat16) return false;
    ty = x.dtype == DType::kFloat16 ? CUDA_R_16F : CUDA_R_16BF;
  }
  TS_CHECK_VALUE(ws.is_contiguous() && ws.numel() >= a.N * a.K,
                 "workspace: expected a contiguous tensor of at least N*K = " +
                     std::to_string(a.N * a.K) + " elements, got shape " + shape_str(ws));
  const int64_t ldb = a.M == 1 ? a.K : a.xs0, ldc = a.M == 1 ? a.N : a.os0;
  if (a.M > INT_MAX || a.N > INT_MAX || a.K > INT_MAX || ldb > INT_MAX || ldc > INT_MAX ||
      ldb < a.K || ldc < a.N)
    return false;

  TensorView w;  // the dequantized weight, [N, K] row-major, in x's dtype
  w.data = ws.data;
  w.dtype = x.dtype;
  w.ndim = 2;
  w.shape[0] = a.N;
  w.shape[1] = a.K;
  w.strides[0] = a.K;
  w.strides[1] = 1;
  w.device = DeviceType::kCUDA;
  w.device_index = x.device_index;
  w.stream = x.stream;
  cuda::dequantize(qweight, scales, zero_points, fmt, group_size, w);

  // Row-major out[M, N] is column-major out^T[N, M] = W[N, K] (column-major W^T) . x^T.
  const float alpha = 1.0f, beta = 0.0f;
  cublasStatus_t st;
  {
    std::lock_guard<std::mutex> lock(cublas_mutex());
    cublasHandle_t h = cublas_handle(x.device_index, stream);
    st = cublasSetStream(h, stream);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(a.N), static_cast<int>(a.M),
                        static_cast<int>(a.K), &alpha, ws.data, ty, static_cast<int>(a.K), x.data,
                        ty, static_cast<int>(ldb), &beta, out.data, ty, static_cast<int>(ldc),
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }
  if (st != CUBLAS_STATUS_SUCCESS)
    throw RuntimeError(std::string("cublasGemmEx failed: ") + cublasGetStatusString(st));
  if (a.bias) {
    const int64_t blocks = (a.M * a.N + 255) / 256;
    const int grid = static_cast<int>(blocks < 65536 ? blocks : 65536);
    dispatch_float(x.dtype, [&](auto tag) {
      add_bias_kernel<decltype(tag)><<<grid, 256, 0, stream>>>(a.out, a.os0, a.M, a.N, a.bias);
      TS_CUDA_CHECK_LAUNCH("add_bias_kernel");
    });
  }
  return true;
}

#endif  // TENSORSLIM_HAVE_CUBLAS

}  // namespace

void linear_weight_only(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                        const TensorView* zero_points, const TensorView* bias, Format fmt,
                        int64_t group_size, const TensorView& out, const TensorView* workspace) {
  check_cuda_views("linear_weight_only", {{&x, "x"},
                                          {&qweight, "qweight"},
                                          {&scales, "scales"},
                                          {zero_points, "zero_points"},
                                          {bias, "bias"},
                                          {&out, "out"},
                                          {workspace, "workspace"}});
  const int64_t K = check_linear_args(x, qweight, scales, zero_points, bias, fmt, group_size, out);
  const FormatInfo& info = format_info(fmt);
  const int64_t M = x.shape[0], N = qweight.shape[0];
  if (M == 0 || N == 0) return;
  DeviceGuard guard(x.device_index);
  const cudaStream_t stream = stream_of(x);

  WqArgs a{};
  a.x = x.data;
  a.xs0 = x.strides[0];
  TS_CHECK_VALUE(M <= INT_MAX, "linear_weight_only: too many rows in x");
  a.M = static_cast<int>(M);
  a.K = K;
  a.N = N;
  a.qw = qweight.ptr<uint8_t>();
  a.qs0 = qweight.strides[0];
  a.scales = scales.ptr<float>();
  a.zps = zero_points ? zero_points->ptr<uint8_t>() : nullptr;
  a.G = scales.shape[1];
  a.gsize = a.G > 0 && K > 0 ? K / a.G : 1;  // scales are [N, K / group] (one column per row)
  a.gshift = -1;
  for (int s = 0; s < 62; ++s)
    if ((int64_t{1} << s) == a.gsize) a.gshift = s;
  a.is_signed = !info.has_zero_point;
  a.bits = info.bits;
  a.bias = bias ? bias->ptr<float>() : nullptr;
  a.out = out.data;
  a.os0 = out.strides[0];

  if (M <= kFusedMaxRows) {
    dispatch_float(x.dtype, [&](auto tag) { launch_gemv<decltype(tag)>(a, x.device_index, stream); });
    return;
  }
#ifdef TENSORSLIM_HAVE_CUBLAS
  if (workspace && K > 0 &&
      linear_cublas(a, x, qweight, scales, zero_points, fmt, group_size, out, *workspace, stream))
    return;
#else
  (void)workspace;
#endif
  dispatch_float(x.dtype, [&](auto tag) { launch_tiled<decltype(tag)>(a, stream); });
}

}  // namespace cuda
}  // namespace tensorslim
