// oneDNN INT8 matmul: u8 (with zero point) or s8 activations x s8 weights -> s32, rescaled
// to f32 in the primitive's epilogue.
//  - one activation scale (static):  src scale + src zero point + per-N weight scales + bias
//    are all fused into the primitive.
//  - one scale per token (dynamic):  oneDNN 3.x only has a reference kernel for per-row src
//    scales (and for per-row binary post-ops), so the primitive applies the weight scales
//    (and the zero point) and we finish with out = out * act_scale[m] + bias[n] in one pass.
//  - packed weights: with u8 activations the weights may come pre-blocked in the layout
//    oneDNN picks for (K, N) (linear_int8_pack), which saves re-blocking them on each call
//    (5x at M = 1). The layout does not depend on M for the brgemm kernels we get; should a
//    primitive refuse it, we run on the plain weights instead.
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "onednn_engine.h"
#include "parallel.h"
#include "tensorslim/gemm_int8.h"

namespace tensorslim {
namespace cpu {
namespace {

using dt = dnnl::memory::data_type;

constexpr int64_t kCanonicalM = 32;  // the M whose weight layout defines the packed format

dnnl::primitive_attr make_attr(bool per_token, bool is_u8) {
  dnnl::primitive_attr attr;
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, 1 << 1);
  if (!per_token) attr.set_scales_mask(DNNL_ARG_SRC, 0);
  if (is_u8) attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
  return attr;
}

// oneDNN's u8 x s8 kernels are exact only with VNNI (or AMX): without it they sum pairs of
// products in saturating int16 (vpmaddubsw), which is wrong by up to ~50% on real data.
bool exact_impl(const std::string& impl) { return onednn_int8_is_exact(impl); }

// The blocked weight layout for u8 activations of (K, N); a zero desc when there is none.
// Caller holds onednn().mu.
const dnnl::memory::desc& packed_desc(int64_t K, int64_t N) {
  static std::map<std::pair<int64_t, int64_t>, dnnl::memory::desc> cache;
  auto it = cache.find({K, N});
  if (it != cache.end()) return it->second;
  dnnl::memory::desc d;
  try {
    dnnl::memory::desc src({kCanonicalM, K}, dt::u8, {K, 1});
    dnnl::memory::desc wei({K, N}, dt::s8, dnnl::memory::format_tag::any);
    dnnl::memory::desc dst({kCanonicalM, N}, dt::f32, {N, 1});
    dnnl::matmul::primitive_desc pd(onednn().engine, src, wei, dst, make_attr(false, true));
    if (exact_impl(pd.impl_info_str())) d = pd.weights_desc();
  } catch (const dnnl::error&) {
    d = dnnl::memory::desc();
  }
  if (cache.size() > 256) cache.clear();
  return cache.emplace(std::make_pair(K, N), d).first->second;
}

// (M, K, N, src is u8, per-token scales, has bias, packed weights)
using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool, bool, bool>;

struct Entry {
  bool ok = false;  // an implementation exists and is exact
  bool packed = false;  // weights come in packed_desc(K, N)
  std::string impl;
  dnnl::matmul prim;
  dnnl::memory::desc src, wei, dst, bias, scalar_f32, scalar_s32, wscales;
};

Entry make_entry(const Key& key) {
  auto [M, K, N, is_u8, per_token, has_bias, packed] = key;
  Entry e;
  e.packed = packed;
  e.src = dnnl::memory::desc({M, K}, is_u8 ? dt::u8 : dt::s8, {K, 1});
  e.wei = packed ? packed_desc(K, N) : dnnl::memory::desc({K, N}, dt::s8, {1, K});  // [N, K] rows
  e.dst = dnnl::memory::desc({M, N}, dt::f32, {N, 1});
  e.scalar_f32 = dnnl::memory::desc({1}, dt::f32, {1});
  e.scalar_s32 = dnnl::memory::desc({1}, dt::s32, {1});
  e.wscales = dnnl::memory::desc({N}, dt::f32, {1});
  if (packed && e.wei.get_size() == 0) return e;
  const bool fused_bias = has_bias && !per_token;
  if (fused_bias) e.bias = dnnl::memory::desc({1, N}, dt::f32, {N, 1});
  try {
    dnnl::matmul::primitive_desc pd(onednn().engine, e.src, e.wei, e.bias, e.dst,
                                    make_attr(per_token, is_u8));
    e.impl = pd.impl_info_str();
    e.ok = exact_impl(e.impl);
    if (e.ok) e.prim = dnnl::matmul(pd);
  } catch (const dnnl::error&) {
    e.ok = false;  // no implementation: the caller falls back
  }
  return e;
}

const Entry& entry_for(const Key& key) {
  static std::map<Key, Entry> cache;  // guarded by onednn().mu
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() > 256) cache.clear();  // bound memory when shapes vary a lot
    it = cache.emplace(key, make_entry(key)).first;
  }
  return it->second;
}

Key key_of(const TensorView& qx, const TensorView& act_scales, const TensorView& qweight,
           const TensorView* bias, bool packed) {
  const int64_t M = qx.shape[0];
  const bool per_token = act_scales.shape[0] == M && M != 1;
  return Key{M, qx.shape[1], qweight.shape[0], qx.dtype == DType::kUInt8, per_token,
             bias != nullptr, packed};
}

}  // namespace

bool linear_int8_onednn(const TensorView& qx, const TensorView& act_scales,
                        int32_t act_zero_point, const TensorView& qweight,
                        const TensorView& w_scales, const TensorView* bias,
                        const TensorView& out, const TensorView* packed) {
  if (!onednn_usable()) return false;
  OneDnn& eng = onednn();
  bool per_token;
  {
    std::lock_guard<std::mutex> lock(eng.mu);
    const bool use_packed = packed != nullptr && qx.dtype == DType::kUInt8;
    const Entry* e = &entry_for(key_of(qx, act_scales, qweight, bias, use_packed));
    if (!e->ok && use_packed) e = &entry_for(key_of(qx, act_scales, qweight, bias, false));
    if (!e->ok) return false;
    per_token = act_scales.shape[0] == qx.shape[0] && qx.shape[0] != 1;
    int32_t zp = act_zero_point;
    void* wdata = e->packed ? packed->data : qweight.data;
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, dnnl::memory(e->src, eng.engine, qx.data)},
        {DNNL_ARG_WEIGHTS, dnnl::memory(e->wei, eng.engine, wdata)},
        {DNNL_ARG_DST, dnnl::memory(e->dst, eng.engine, out.data)},
        {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS,
         dnnl::memory(e->wscales, eng.engine, w_scales.data)},
    };
    if (!per_token)
      args[DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC] =
          dnnl::memory(e->scalar_f32, eng.engine, act_scales.data);
    if (qx.dtype == DType::kUInt8)
      args[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC] = dnnl::memory(e->scalar_s32, eng.engine, &zp);
    if (bias && !per_token) args[DNNL_ARG_BIAS] = dnnl::memory(e->bias, eng.engine, bias->data);
    e->prim.execute(eng.stream, args);
    eng.stream.wait();
  }
  if (per_token) {
    const int64_t M = qx.shape[0], N = qweight.shape[0];
    const float* rs = act_scales.ptr<float>();
    const float* b = bias ? bias->ptr<float>() : nullptr;
    // Serial unless large: see row_grain in quantize_act_avx512.cpp.
    parallel_for(M, std::max<int64_t>(8, (int64_t{1} << 22) / std::max<int64_t>(N, 1)),
                 [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        float* row = out.ptr<float>() + m * N;
        const float s = rs[m];
        if (b)
          for (int64_t n = 0; n < N; ++n) row[n] = row[n] * s + b[n];
        else
          for (int64_t n = 0; n < N; ++n) row[n] *= s;
      }
    });
  }
  return true;
}

std::string linear_int8_onednn_impl(const TensorView& qx, const TensorView& act_scales,
                                    int32_t, const TensorView& qweight, const TensorView&,
                                    const TensorView* bias, const TensorView&,
                                    const TensorView* packed) {
  if (!onednn_usable()) return std::string();
  std::lock_guard<std::mutex> lock(onednn().mu);
  const bool use_packed = packed != nullptr && qx.dtype == DType::kUInt8;
  const Entry& e = entry_for(key_of(qx, act_scales, qweight, bias, use_packed));
  if (e.impl.empty()) return std::string();
  return e.impl + (use_packed ? " (packed weights)" : "") + (e.ok ? "" : " (not exact: unused)");
}

int64_t linear_int8_packed_bytes_onednn(int64_t K, int64_t N) {
  if (!onednn_usable()) return 0;
  std::lock_guard<std::mutex> lock(onednn().mu);
  return static_cast<int64_t>(packed_desc(K, N).get_size());
}

namespace {

// The implementation oneDNN picks for a packed-weight u8 x s8 matmul ("" if none).
std::string packed_matmul_impl() {
  if (!onednn_usable()) return std::string();
  std::lock_guard<std::mutex> lock(onednn().mu);
  static const std::string impl = [] {
    try {
      const int64_t K = 1024, N = 1024;
      dnnl::memory::desc src({kCanonicalM, K}, dt::u8, {K, 1});
      dnnl::memory::desc wei({K, N}, dt::s8, dnnl::memory::format_tag::any);
      dnnl::memory::desc dst({kCanonicalM, N}, dt::f32, {N, 1});
      dnnl::matmul::primitive_desc pd(onednn().engine, src, wei, dst, make_attr(false, true));
      return std::string(pd.impl_info_str());
    } catch (const dnnl::error&) {
      return std::string();
    }
  }();
  return impl;
}

}  // namespace

bool onednn_int8_uses_amx() {  // asked on every packed call: the answer is kept
  static const bool amx = packed_matmul_impl().find("amx") != std::string::npos;
  return amx;
}

bool linear_int8_packing_pays_onednn() {
  // AMX kernels read the plain [N, K] weight 15-40% faster than their own blocked copy at
  // 40-512 rows with cold weights (4096 x 4096, Sapphire Rapids), and the copy doubles the
  // resident weight; kernels without AMX were measured 5x faster at batch 1 with it. No
  // packing either where packed_desc has none (an inexact kernel: ours run instead).
  const std::string impl = packed_matmul_impl();
  return exact_impl(impl) && !onednn_int8_uses_amx();  // as packed_desc
}

void linear_int8_pack_onednn(const TensorView& qweight, const TensorView& packed) {
  OneDnn& eng = onednn();
  std::lock_guard<std::mutex> lock(eng.mu);
  const int64_t N = qweight.shape[0], K = qweight.shape[1];
  const dnnl::memory::desc& d = packed_desc(K, N);
  TS_CHECK_VALUE(d.get_size() != 0, "linear_int8_pack: oneDNN has no packed layout here");
  dnnl::memory src({{K, N}, dt::s8, {1, K}}, eng.engine, qweight.data);
  dnnl::memory dst(d, eng.engine, packed.data);
  dnnl::reorder(src, dst).execute(eng.stream, src, dst);
  eng.stream.wait();
}

}  // namespace cpu
}  // namespace tensorslim
