// tensorslim_cuda_bench: speed of the CUDA kernels against the GPU's own limits, with
// nothing but the CUDA toolkit (cuBLAS optional). Run by benchmarks/bench_cuda.py.
//   1. device copy bandwidth (cudaMemcpyAsync device to device, 1 GiB; read + write);
//   2. cuda::quantize on 8192x8192 fp16 / fp32 (int8 per row, int4 g128): bytes moved
//      per second as a fraction of the copy bandwidth (target >= 70%);
//   3. cuda::linear_weight_only, INT4 g128 and INT8 per row, M = 1, 8, 64, against
//      cuBLAS fp16 (cublasGemmEx, fp16 in, fp32 compute) at LLM layer shapes (target:
//      INT4 M=1 >= 3x cuBLAS fp16).
// Timing: CUDA events, warm-up, median of >= 20 samples. Weights rotate through enough
// copies to exceed 4x the L2 cache, so every call streams its weight from HBM (a
// decode step does). Linear calls are replayed from a CUDA graph when capture works, so
// host launch overhead is not counted for either side.
#include <cuda_runtime.h>

#ifdef TENSORSLIM_HAVE_CUBLAS
#include <cublas_v2.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "half.h"
#include "tensorslim/cuda.h"
#include "tensorslim/formats.h"

namespace {

using namespace tensorslim;

constexpr int kSamples = 25;
constexpr int kWarmup = 3;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { check(cudaMalloc(&p_, bytes), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return p_; }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_;
};

TensorView dview(void* data, DType dt, int64_t rows, int64_t cols, cudaStream_t s) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = rows < 0 ? 1 : 2;
  if (rows < 0) {
    v.shape[0] = cols;
    v.strides[0] = 1;
  } else {
    v.shape[0] = rows;
    v.shape[1] = cols;
    v.strides[0] = cols;
    v.strides[1] = 1;
  }
  v.device = DeviceType::kCUDA;
  v.stream = s;
  return v;
}

// Gaussian-like values (sum of uniforms) with rare outliers, as trained weights have;
// a cheap generator so 64M values take well under a second.
void fill_random(DeviceBuffer& buf, DType dt, int64_t n, uint32_t seed) {
  std::vector<uint8_t> host(buf.bytes());
  uint64_t s = 0x9E3779B97F4A7C15ull * (seed + 1);
  auto next = [&] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<float>(s >> 40) * (1.0f / 16777216.0f);
  };
  for (int64_t i = 0; i < n; ++i) {
    float v = (next() + next() + next() - 1.5f) * 2.0f;
    if (i % 97 == 0) v *= 8.0f;
    if (dt == DType::kFloat32) {
      std::memcpy(host.data() + 4 * i, &v, 4);
    } else {
      const uint16_t h = dt == DType::kFloat16 ? cpu::float_to_f16(v) : cpu::float_to_bf16(v);
      std::memcpy(host.data() + 2 * i, &h, 2);
    }
  }
  check(cudaMemcpy(buf.get(), host.data(), host.size(), cudaMemcpyHostToDevice), "upload");
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median time of one call in microseconds: `reps` calls per sample (call index passed
// to op), kSamples samples after kWarmup warm-up samples. With use_graph the reps calls
// are captured once and the graph is replayed; returns a negative value when capture
// failed (the caller then times direct calls).
double time_us(cudaStream_t s, int reps, const std::function<void(int)>& op, bool use_graph) {
  cudaEvent_t t0, t1;
  check(cudaEventCreate(&t0), "event");
  check(cudaEventCreate(&t1), "event");
  cudaGraphExec_t exec = nullptr;
  if (use_graph) {
    cudaGraph_t graph = nullptr;
    bool ok = cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed) == cudaSuccess;
    if (ok) {
      try {
        for (int i = 0; i < reps; ++i) op(i);
      } catch (const std::exception&) {
        ok = false;
      }
      ok = cudaStreamEndCapture(s, &graph) == cudaSuccess && ok;
    }
    ok = ok && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    if (graph) cudaGraphDestroy(graph);
    if (!ok) {
      cudaGetLastError();
      cudaEventDestroy(t0);
      cudaEventDestroy(t1);
      return -1.0;
    }
  }
  std::vector<double> us;
  int idx = 0;
  for (int sample = 0; sample < kWarmup + kSamples; ++sample) {
    check(cudaEventRecord(t0, s), "record");
    if (exec) {
      check(cudaGraphLaunch(exec, s), "graph launch");
    } else {
      for (int i = 0; i < reps; ++i) op(idx++);
    }
    check(cudaEventRecord(t1, s), "record");
    check(cudaEventSynchronize(t1), "sync");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, t0, t1), "elapsed");
    if (sample >= kWarmup) us.push_back(1000.0 * ms / reps);
  }
  if (exec) cudaGraphExecDestroy(exec);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return median(us);
}

double l2_bytes() {
  int dev = 0, l2 = 0;
  check(cudaGetDevice(&dev), "device");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "L2 size");
  return l2 > 0 ? l2 : 64.0 * 1024 * 1024;
}

// Copies of a buffer of `bytes` needed so a rotation through them overflows 4x the L2.
int copies_for(double bytes) {
  const int n = static_cast<int>(std::ceil(4.0 * l2_bytes() / bytes));
  return std::max(1, std::min(n, 64));
}

// ---------------------------------------------------------------- 1. copy bandwidth

double copy_bandwidth_gbs(cudaStream_t s) {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer a(bytes), b(bytes);
  check(cudaMemsetAsync(a.get(), 1, bytes, s), "memset");
  const double us = time_us(s, 1, [&](int) {
    check(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s), "copy");
  }, false);
  const double gbs = 2.0 * bytes / (us * 1e-6) / 1e9;
  std::printf("device copy (cudaMemcpyAsync D2D, 1 GiB): %.1f us, %.0f GB/s (read + write)\n\n", us,
              gbs);
  return gbs;
}

// ---------------------------------------------------------------- 2. quantize

void bench_quantize(cudaStream_t s, double copy_gbs) {
  const int64_t rows = 8192, cols = 8192;
  std::printf("quantize, %lldx%lld (time per call includes the NaN-flag readback and sync)\n",
              static_cast<long long>(rows), static_cast<long long>(cols));
  std::printf("%-8s %-6s %-8s %10s %10s %9s %s\n", "input", "format", "group", "time us", "GB/s",
              "% copy", "target >= 70%");
  struct Q {
    Format fmt;
    int64_t group;
    const char* label;
  };
  for (DType dt : {DType::kFloat16, DType::kFloat32}) {
    DeviceBuffer x(static_cast<size_t>(rows * cols * dtype_size(dt)));
    fill_random(x, dt, rows * cols, 1);
    for (const Q& q : {Q{Format::kInt8, cols, "per-row"}, Q{Format::kInt4, 128, "g128"}}) {
      const FormatInfo& info = format_info(q.fmt);
      const int64_t nb = packed_row_bytes(info, cols), groups = cols / q.group;
      DeviceBuffer codes(static_cast<size_t>(rows * nb)), scales(static_cast<size_t>(rows * groups * 4));
      const TensorView xv = dview(x.get(), dt, rows, cols, s);
      const TensorView qv = dview(codes.get(), info.bits == 8 ? DType::kInt8 : DType::kUInt8, rows, nb, s);
      const TensorView sv = dview(scales.get(), DType::kFloat32, rows, groups, s);
      const double us = time_us(s, 1, [&](int) { cuda::quantize(xv, q.fmt, q.group, qv, sv, nullptr); },
                                false);
      const double bytes = static_cast<double>(x.bytes() + codes.bytes() + scales.bytes());
      const double gbs = bytes / (us * 1e-6) / 1e9;
      const double frac = 100.0 * gbs / copy_gbs;
      std::printf("%-8s %-6s %-8s %10.1f %10.0f %8.1f%% %s\n", dtype_name(dt), info.name, q.label, us,
                  gbs, frac, frac >= 70.0 ? "met" : "NOT met");
    }
  }
  std::printf("\n");
}

// ---------------------------------------------------------------- 3. linear

#ifdef TENSORSLIM_HAVE_CUBLAS
struct Cublas {
  cublasHandle_t h = nullptr;
  explicit Cublas(cudaStream_t s) {
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublasCreate failed\n");
      std::exit(1);
    }
    cublasSetStream(h, s);
  }
  ~Cublas() { cublasDestroy(h); }
  // out[M, N] = x[M, K] . W[N, K]^T, fp16 in and out, fp32 accumulation.
  void gemm(const void* w, const void* x, void* out, int M, int K, int N) const {
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t st =
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, CUDA_R_16F, K, x, CUDA_R_16F, K,
                     &beta, out, CUDA_R_16F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasGemmEx failed");
  }
};
#endif

// One quantized weight, replicated so that a rotation through the copies streams from HBM.
struct QuantWeight {
  std::vector<std::unique_ptr<DeviceBuffer>> q, scales;
  int64_t nb = 0, groups = 0;
  double bytes = 0;  // codes + scales of one copy
};

QuantWeight make_quant_weight(cudaStream_t s, Format fmt, int64_t N, int64_t K, int64_t group) {
  const FormatInfo& info = format_info(fmt);
  QuantWeight w;
  w.nb = packed_row_bytes(info, K);
  w.groups = K / group;
  w.bytes = static_cast<double>(N * w.nb + N * w.groups * 4);
  DeviceBuffer src(static_cast<size_t>(N * K * 2));
  fill_random(src, DType::kFloat16, N * K, 7);
  const int copies = copies_for(w.bytes);
  for (int c = 0; c < copies; ++c) {
    w.q.emplace_back(new DeviceBuffer(static_cast<size_t>(N * w.nb)));
    w.scales.emplace_back(new DeviceBuffer(static_cast<size_t>(N * w.groups * 4)));
    if (c == 0) {
      cuda::quantize(dview(src.get(), DType::kFloat16, N, K, s), fmt, group,
                     dview(w.q[0]->get(), info.bits == 8 ? DType::kInt8 : DType::kUInt8, N, w.nb, s),
                     dview(w.scales[0]->get(), DType::kFloat32, N, w.groups, s), nullptr);
    } else {
      check(cudaMemcpy(w.q[c]->get(), w.q[0]->get(), w.q[0]->bytes(), cudaMemcpyDeviceToDevice), "copy");
      check(cudaMemcpy(w.scales[c]->get(), w.scales[0]->get(), w.scales[0]->bytes(),
                       cudaMemcpyDeviceToDevice),
            "copy");
    }
  }
  return w;
}

void bench_linear(cudaStream_t s, double copy_gbs) {
  struct Shape {
    int64_t K, N;
  };
  const Shape shapes[] = {{4096, 4096}, {4096, 11008}, {8192, 8192}, {11008, 4096}};
  struct Fmt {
    Format fmt;
    bool per_row;
    const char* label;
  };
  const Fmt fmts[] = {{Format::kInt4, false, "int4 g128"}, {Format::kInt8, true, "int8 per-row"}};
  const int64_t Ms[] = {1, 8, 64};
#ifdef TENSORSLIM_HAVE_CUBLAS
  Cublas cublas(s);
#endif
  std::printf("linear_weight_only, fp16 activations (ours) vs cuBLAS fp16 GEMM (fp32 compute)\n");
  std::printf("%-6s %-6s %-13s %4s %10s %12s %8s %10s %8s\n", "K", "N", "format", "M", "ours us",
              "cuBLAS us", "speedup", "ours GB/s", "% copy");
#ifdef TENSORSLIM_HAVE_CUBLAS
  int int4_m1_met = 0, int4_m1_total = 0;
#endif
  bool graphs = true;
  for (const Shape& sh : shapes) {
    const int64_t K = sh.K, N = sh.N;
#ifdef TENSORSLIM_HAVE_CUBLAS
    // The fp16 baseline weight, replicated past the L2 like ours.
    std::vector<std::unique_ptr<DeviceBuffer>> w16;
    const int copies16 = copies_for(static_cast<double>(N * K * 2));
    for (int c = 0; c < copies16; ++c) {
      w16.emplace_back(new DeviceBuffer(static_cast<size_t>(N * K * 2)));
      if (c == 0)
        fill_random(*w16[0], DType::kFloat16, N * K, 9);
      else
        check(cudaMemcpy(w16[c]->get(), w16[0]->get(), w16[0]->bytes(), cudaMemcpyDeviceToDevice), "copy");
    }
#endif
    DeviceBuffer workspace(static_cast<size_t>(N * K * 2));
    for (const Fmt& f : fmts) {
      const FormatInfo& info = format_info(f.fmt);
      const int64_t group = f.per_row ? K : 128;
      QuantWeight w = make_quant_weight(s, f.fmt, N, K, group);
      const int copies = static_cast<int>(w.q.size());
      for (int64_t M : Ms) {
        DeviceBuffer x(static_cast<size_t>(M * K * 2)), out(static_cast<size_t>(M * N * 2));
        fill_random(x, DType::kFloat16, M * K, 3);
        const TensorView xv = dview(x.get(), DType::kFloat16, M, K, s);
        const TensorView ov = dview(out.get(), DType::kFloat16, M, N, s);
        const TensorView wsv = dview(workspace.get(), DType::kFloat16, N, K, s);
        const DType code_dt = info.bits == 8 ? DType::kInt8 : DType::kUInt8;
        auto ours = [&](int i) {
          const int c = i % copies;
          cuda::linear_weight_only(xv, dview(w.q[c]->get(), code_dt, N, w.nb, s),
                                   dview(w.scales[c]->get(), DType::kFloat32, N, w.groups, s),
                                   nullptr, nullptr, f.fmt, group, ov,
                                   M > cuda::kFusedMaxRows ? &wsv : nullptr);
        };
        const int reps = std::max(copies, 20);
        ours(0);  // first call outside any capture: module loading, cuBLAS handle creation
        double ours_us = graphs ? time_us(s, reps, ours, true) : -1.0;
        if (ours_us < 0) {
          graphs = false;
          ours_us = time_us(s, reps, ours, false);
        }
        const double moved = w.bytes + static_cast<double>(M * K * 2 + M * N * 2);
        const double gbs = moved / (ours_us * 1e-6) / 1e9;
        char base[32] = "n/a (no cuBLAS)", speed[32] = "n/a";
#ifdef TENSORSLIM_HAVE_CUBLAS
        auto baseline = [&](int i) {
          cublas.gemm(w16[i % copies16]->get(), x.get(), out.get(), static_cast<int>(M),
                      static_cast<int>(K), static_cast<int>(N));
        };
        const int reps16 = std::max(copies16, 20);
        baseline(0);
        double base_us = graphs ? time_us(s, reps16, baseline, true) : -1.0;
        if (base_us < 0) base_us = time_us(s, reps16, baseline, false);
        std::snprintf(base, sizeof(base), "%.1f", base_us);
        std::snprintf(speed, sizeof(speed), "%.2fx", base_us / ours_us);
        if (f.fmt == Format::kInt4 && M == 1) {
          ++int4_m1_total;
          if (base_us / ours_us >= 3.0) ++int4_m1_met;
        }
#endif
        std::printf("%-6lld %-6lld %-13s %4lld %10.1f %12s %8s %10.0f %7.1f%%\n",
                    static_cast<long long>(K), static_cast<long long>(N), f.label,
                    static_cast<long long>(M), ours_us, base, speed, gbs, 100.0 * gbs / copy_gbs);
      }
    }
  }
  std::printf("(timing: %s; M > %lld runs dequantize + %s)\n",
              graphs ? "CUDA graph replay" : "direct launches (graph capture failed)",
              static_cast<long long>(cuda::kFusedMaxRows),
#ifdef TENSORSLIM_HAVE_CUBLAS
              "cuBLAS"
#else
              "the tiled fused kernel"
#endif
  );
#ifdef TENSORSLIM_HAVE_CUBLAS
  std::printf("target INT4 g128 M=1 >= 3x cuBLAS fp16: %s (%d of %d shapes)\n",
              int4_m1_met == int4_m1_total ? "met" : "NOT met", int4_m1_met, int4_m1_total);
#else
  std::printf("target INT4 g128 M=1 >= 3x cuBLAS fp16: n/a (no cuBLAS)\n");
#endif
}

}  // namespace

int main() {
  if (cuda::device_count() == 0) {
    std::printf("no CUDA device: skipped\n");
    return 0;
  }
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "device properties");
  std::printf("device: %s, %d SMs, L2 %.0f MiB\n\n", prop.name, prop.multiProcessorCount,
              l2_bytes() / (1024.0 * 1024.0));
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  try {
    const double copy_gbs = copy_bandwidth_gbs(s);
    bench_quantize(s, copy_gbs);
    bench_linear(s, copy_gbs);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  check(cudaStreamDestroy(s), "stream");
  return 0;
}
