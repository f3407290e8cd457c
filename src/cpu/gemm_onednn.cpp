// oneDNN weight-decompression matmul: int8/int4 weights (s8/u8/s4/u4) with grouped
// fp32 scales and uint8 zero points, fp32 or bf16 activations and output; and oneDNN's
// sgemm for the decoded tiles of linear_lowbit.
#include <oneapi/dnnl/dnnl.hpp>

#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "half.h"
#include "onednn_engine.h"
#include "tensorslim/gemm.h"

namespace tensorslim {
namespace cpu {
namespace {

using dt = dnnl::memory::data_type;

dt weight_type(Format fmt) {
  switch (fmt) {
    case Format::kInt8: return dt::s8;
    case Format::kUInt8: return dt::u8;
    case Format::kInt4: return dt::s4;
    case Format::kUInt4: return dt::u4;
  }
  return dt::undef;
}

// (M, K, N, x dtype, format, group, has zp, has bias, x row stride, out row stride)
using Key = std::tuple<int64_t, int64_t, int64_t, int, int, int64_t, bool, bool, int64_t, int64_t>;

struct Entry {
  bool ok = false;
  dnnl::matmul prim;
  dnnl::memory::desc src, wei, dst, bias, scales, zps;
  std::string impl;  // oneDNN's name for the kernel it chose
};

Entry make_entry(const Key& key) {
  auto [M, K, N, xdt, fmt, group, has_zp, has_bias, xs, os] = key;
  Entry e;
  const dt act = static_cast<DType>(xdt) == DType::kFloat32 ? dt::f32 : dt::bf16;
  const bool per_row = group == K;
  e.src = dnnl::memory::desc({M, K}, act, {xs, 1});
  e.dst = dnnl::memory::desc({M, N}, act, {os, 1});
  e.wei = dnnl::memory::desc({K, N}, weight_type(static_cast<Format>(fmt)), {1, K});
  if (has_bias) e.bias = dnnl::memory::desc({1, N}, dt::f32, {N, 1});
  dnnl::primitive_attr attr;
  attr.set_fpmath_mode(act == dt::f32 ? dnnl::fpmath_mode::strict : dnnl::fpmath_mode::bf16, true);
  const int mask = per_row ? (1 << 1) : (1 << 0) | (1 << 1);
  const dnnl::memory::dims groups = per_row ? dnnl::memory::dims{} : dnnl::memory::dims{group, 1};
  attr.set_scales(DNNL_ARG_WEIGHTS, mask, groups, dt::f32);
  e.scales = per_row ? dnnl::memory::desc({N}, dt::f32, {1})
                     : dnnl::memory::desc({K / group, N}, dt::f32, {N, 1});
  if (has_zp) {
    attr.set_zero_points(DNNL_ARG_WEIGHTS, mask, groups, dt::u8);
    e.zps = per_row ? dnnl::memory::desc({N}, dt::u8, {1})
                    : dnnl::memory::desc({K / group, N}, dt::u8, {N, 1});
  }
  try {
    dnnl::matmul::primitive_desc pd(onednn().engine, e.src, e.wei, e.bias, e.dst, attr);
    e.prim = dnnl::matmul(pd);
    e.impl = pd.impl_info_str();
    e.ok = true;
  } catch (const dnnl::error&) {
    e.ok = false;  // no implementation: the caller falls back
  }
  return e;
}

// oneDNN wants grouped scales as [K/group, N]; ours are [N, K/group].
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, std::vector<T>& dst) {
  dst.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

bool run_onednn(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                const TensorView* zero_points, const TensorView* bias, Format fmt,
                int64_t group_size, const TensorView& out) {
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  if (qweight.strides[0] != (K * format_info(fmt).bits) / 8) return false;
  const Key key{M, K, N, static_cast<int>(x.dtype), static_cast<int>(fmt), group_size,
                zero_points != nullptr, bias != nullptr, x.strides[0], out.strides[0]};
  OneDnn& eng = onednn();
  std::lock_guard<std::mutex> lock(eng.mu);
  static std::map<Key, Entry> cache;
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() > 256) cache.clear();  // bound memory when shapes vary a lot
    it = cache.emplace(key, make_entry(key)).first;
  }
  const Entry* entry = &it->second;
  if (!entry->ok) return false;

  const bool per_row = group_size == K;
  thread_local std::vector<float> sc_t;
  thread_local std::vector<uint8_t> zp_t;
  void* sc_ptr = scales.data;
  void* zp_ptr = zero_points ? zero_points->data : nullptr;
  if (!per_row) {
    transpose(scales.ptr<float>(), N, K / group_size, sc_t);
    sc_ptr = sc_t.data();
    if (zero_points) {
      transpose(zero_points->ptr<uint8_t>(), N, K / group_size, zp_t);
      zp_ptr = zp_t.data();
    }
  }
  std::unordered_map<int, dnnl::memory> args = {
      {DNNL_ARG_SRC, dnnl::memory(entry->src, eng.engine, x.data)},
      {DNNL_ARG_WEIGHTS, dnnl::memory(entry->wei, eng.engine, qweight.data)},
      {DNNL_ARG_DST, dnnl::memory(entry->dst, eng.engine, out.data)},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, dnnl::memory(entry->scales, eng.engine, sc_ptr)},
  };
  if (bias) args[DNNL_ARG_BIAS] = dnnl::memory(entry->bias, eng.engine, bias->data);
  if (zero_points)
    args[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_WEIGHTS] =
        dnnl::memory(entry->zps, eng.engine, zp_ptr);
  entry->prim.execute(eng.stream, args);
  eng.stream.wait();
  return true;
}

// A plain fp32 [rows, cols] view over buf, resized to fit.
TensorView f32_view(std::vector<float>& buf, int64_t rows, int64_t cols) {
  buf.resize(rows * cols);
  return contiguous_view2(buf.data(), DType::kFloat32, rows, cols);
}

}  // namespace

bool onednn_weight_only_uses_amx() {
  static const bool amx = [] {
    if (!onednn_usable()) return false;
    std::lock_guard<std::mutex> lock(onednn().mu);
    // A bf16 decompression matmul of a 4096 x 4096 INT8 weight at 64 rows, per-row scales.
    const Entry e = make_entry(Key{64, 4096, 4096, static_cast<int>(DType::kBFloat16), static_cast<int>(Format::kInt8),
                                   4096, false, false, 4096, 4096});
    return e.ok && e.impl.find("amx") != std::string::npos;
  }();
  return amx;
}

bool linear_weight_only_onednn(const TensorView& x, const TensorView& qweight,
                               const TensorView& scales, const TensorView* zero_points,
                               const TensorView* bias, Format fmt, int64_t group_size,
                               const TensorView& out) {
  if (!onednn_usable()) return false;
  // oneDNN's grouped scales need groups of one size: a short last group runs elsewhere.
  const int64_t K = x.shape[1];
  if (group_size >= K) group_size = K;  // one group spans the row: per-row scales
  if (K % group_size) return false;
  // oneDNN addresses 4-bit weights with element strides: a row of odd K is not expressible (on
  // any ISA, so the bf16 retry below would widen x for nothing).
  if (format_info(fmt).bits == 4 && K % 2) return false;
  if (run_onednn(x, qweight, scales, zero_points, bias, fmt, group_size, out)) return true;
  if (x.dtype != DType::kBFloat16) return false;
  // oneDNN has bf16 weight decompression only from AVX-512 (avx512_core) on: elsewhere run
  // the fp32 primitive on widened activations (exact) and round the output to bf16.
  const int64_t M = x.shape[0], N = out.shape[1];
  thread_local std::vector<float> xf, of;
  const TensorView xv = f32_view(xf, M, K), ov = f32_view(of, M, N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      xf[m * K + k] = bf16_to_float(x.ptr<uint16_t>()[m * x.strides[0] + k]);
  if (!run_onednn(xv, qweight, scales, zero_points, bias, fmt, group_size, ov)) return false;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      out.ptr<uint16_t>()[m * out.strides[0] + n] = float_to_bf16(of[m * N + n]);
  return true;
}

void sgemm_nt_onednn(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w,
                     int64_t ldw, float* out, int64_t ldo) {
  const dnnl_status_t st = dnnl_sgemm('N', 'T', M, N, K, 1.0f, x, ldx, w, ldw, 0.0f, out, ldo);
  if (st != dnnl_success) throw RuntimeError("linear_lowbit: oneDNN sgemm failed");
}

}  // namespace cpu
}  // namespace tensorslim
