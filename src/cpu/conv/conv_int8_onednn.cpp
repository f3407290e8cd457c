// INT8 convolution on oneDNN (see include/tensorslim/conv_int8.h): u8 channels-last source,
// s8 weights in the layout the primitive picks (packed once by the caller and kept in the
// module), fp32 bias, output scales act_scale * w_scale[oc] and the source zero point fused.
// An epilogue (residual add, activation) runs as oneDNN post-ops on the output in registers.
// Primitives are cached by geometry, so a call only wraps pointers and executes.
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../onednn_engine.h"
#include "tensorslim/conv_int8.h"

namespace tensorslim {
namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
using dims = dnnl::memory::dims;

struct Shape {
  int sp = 0;  // spatial dims: 1 or 2
  int64_t N = 0, C = 0, OC = 0;
  dims in, k, out;
};

Shape check(const TensorView& qx, const TensorView& qweight, const TensorView& out,
            const ConvInt8Geometry& g) {
  Shape s;
  s.sp = qx.ndim - 2;
  TS_CHECK_VALUE(s.sp == 1 || s.sp == 2, "conv_int8: qx must be [N, W, C] or [N, H, W, C], got " +
                                             shape_str(qx));
  check_dtype(qx, DType::kUInt8, "qx");
  check_dtype(qweight, DType::kInt8, "qweight");
  check_dtype(out, DType::kFloat32, "out");
  check_ndim(qweight, s.sp + 2, "qweight");
  check_ndim(out, s.sp + 2, "out");
  check_contiguous(qx, "qx");
  check_contiguous(qweight, "qweight");
  check_contiguous(out, "out");
  TS_CHECK_VALUE(static_cast<int>(g.stride.size()) == s.sp && static_cast<int>(g.padding.size()) == s.sp &&
                     static_cast<int>(g.dilation.size()) == s.sp,
                 "conv_int8: stride, padding and dilation need one value per spatial dimension");
  s.N = qx.shape[0];
  s.C = qx.shape[qx.ndim - 1];
  s.OC = qweight.shape[0];
  TS_CHECK_VALUE(g.groups >= 1 && s.C % g.groups == 0 && s.OC % g.groups == 0 &&
                     qweight.shape[1] * g.groups == s.C,
                 "conv_int8: qweight " + shape_str(qweight) + " does not fit " + std::to_string(s.C) +
                     " input channels in " + std::to_string(g.groups) + " groups");
  TS_CHECK_VALUE(out.shape[0] == s.N && out.shape[out.ndim - 1] == s.OC,
                 "conv_int8: out must be [N, *spatial, OC], got " + shape_str(out));
  for (int d = 0; d < s.sp; ++d) {
    const int64_t in = qx.shape[1 + d], k = qweight.shape[2 + d];
    TS_CHECK_VALUE(g.stride[d] >= 1 && g.dilation[d] >= 1 && g.padding[d] >= 0,
                   "conv_int8: stride and dilation must be >= 1 and padding >= 0");
    const int64_t o = (in + 2 * g.padding[d] - g.dilation[d] * (k - 1) - 1) / g.stride[d] + 1;
    TS_CHECK_VALUE(o >= 1 && out.shape[1 + d] == o,
                   "conv_int8: out " + shape_str(out) + " does not match the convolution's output size");
    s.in.push_back(in);
    s.k.push_back(k);
    s.out.push_back(o);
  }
  return s;
}

dims nc_dims(int64_t n, int64_t c, const dims& sp) {
  dims d{n, c};
  d.insert(d.end(), sp.begin(), sp.end());
  return d;
}

struct Entry {
  bool ok = false;
  std::string impl;
  dnnl::convolution_forward prim;
  dnnl::memory::desc src, wei, bias, dst, scalar_f32, scalar_s32, wscales;
};

bool has_epilogue(const ConvInt8Geometry& g) { return g.has_residual || g.activation != ConvActivation::kNone; }

Entry make_entry(const Shape& s, const ConvInt8Geometry& g) {
  Entry e;
  const tag act = s.sp == 1 ? tag::nwc : tag::nhwc;
  e.src = dnnl::memory::desc(nc_dims(s.N, s.C, s.in), dt::u8, act);
  e.dst = dnnl::memory::desc(nc_dims(s.N, s.OC, s.out), dt::f32, act);
  dims w = g.groups > 1 ? dims{g.groups, s.OC / g.groups, s.C / g.groups} : dims{s.OC, s.C};
  w.insert(w.end(), s.k.begin(), s.k.end());
  const dnnl::memory::desc wei_any(w, dt::s8, tag::any);
  if (g.has_bias) e.bias = dnnl::memory::desc({s.OC}, dt::f32, tag::a);
  e.scalar_f32 = dnnl::memory::desc({1}, dt::f32, tag::a);
  e.scalar_s32 = dnnl::memory::desc({1}, dt::s32, tag::a);
  e.wscales = dnnl::memory::desc({s.OC}, dt::f32, tag::a);
  dnnl::primitive_attr attr;
  attr.set_scales_mask(DNNL_ARG_SRC, 0);
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, g.groups > 1 ? 3 : 1);  // one scale per output channel
  if (g.has_zero_point) attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
  if (has_epilogue(g)) {
    dnnl::post_ops po;
    if (g.has_residual) po.append_binary(dnnl::algorithm::binary_add, e.dst);  // same shape and layout as out
    switch (g.activation) {
      case ConvActivation::kReLU: po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f); break;
      case ConvActivation::kReLU6: po.append_eltwise(dnnl::algorithm::eltwise_clip, 0.f, 6.f); break;
      case ConvActivation::kSiLU: po.append_eltwise(dnnl::algorithm::eltwise_swish, 1.f, 0.f); break;
      case ConvActivation::kGELU: po.append_eltwise(dnnl::algorithm::eltwise_gelu_erf, 0.f, 0.f); break;
      case ConvActivation::kNone: break;
    }
    attr.set_post_ops(po);
  }
  dims dil, pad;
  for (int d = 0; d < s.sp; ++d) {
    dil.push_back(g.dilation[d] - 1);  // oneDNN counts the gaps
    pad.push_back(g.padding[d]);
  }
  try {
    dnnl::convolution_forward::primitive_desc pd(
        cpu::onednn().engine, dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        e.src, wei_any, e.bias, e.dst, dims(g.stride.begin(), g.stride.end()), dil, pad, pad, attr);
    e.impl = pd.impl_info_str();
    e.wei = pd.weights_desc();
    e.prim = dnnl::convolution_forward(pd);
    e.ok = true;
  } catch (const dnnl::error&) {
    e.ok = false;  // no implementation: the caller runs the reference
  }
  return e;
}

// Caller holds onednn().mu.
const Entry& entry_for(const Shape& s, const ConvInt8Geometry& g) {
  static std::map<std::vector<int64_t>, Entry> cache;
  std::vector<int64_t> key{s.sp, s.N, s.C, s.OC, g.groups, g.has_zero_point, g.has_bias, g.has_residual,
                             static_cast<int64_t>(g.activation)};
  for (const dims* v : {&s.in, &s.k, &s.out}) key.insert(key.end(), v->begin(), v->end());
  for (const auto* v : {&g.stride, &g.padding, &g.dilation}) key.insert(key.end(), v->begin(), v->end());
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() > 256) cache.clear();  // bound memory when shapes vary a lot
    it = cache.emplace(key, make_entry(s, g)).first;
  }
  return it->second;
}

// The convolution without its epilogue: what packed weights are made for.
ConvInt8Geometry without_epilogue(ConvInt8Geometry g) {
  g.has_residual = false;
  g.activation = ConvActivation::kNone;
  return g;
}

}  // namespace

std::string conv_int8_impl(const TensorView& qx, const TensorView& qweight, const TensorView& out,
                           const ConvInt8Geometry& g) {
  const Shape s = check(qx, qweight, out, g);
  if (!cpu::onednn_usable()) return std::string();
  std::lock_guard<std::mutex> lock(cpu::onednn().mu);
  const Entry& e = entry_for(s, g);
  return e.ok ? e.impl : std::string();
}

int64_t conv_int8_packed_bytes(const TensorView& qx, const TensorView& qweight, const TensorView& out,
                               const ConvInt8Geometry& g) {
  const Shape s = check(qx, qweight, out, g);
  if (!cpu::onednn_usable()) return 0;
  std::lock_guard<std::mutex> lock(cpu::onednn().mu);
  const Entry& e = entry_for(s, without_epilogue(g));
  return e.ok ? static_cast<int64_t>(e.wei.get_size()) : 0;
}

void conv_int8_pack(const TensorView& qx, const TensorView& qweight, const TensorView& out,
                    const ConvInt8Geometry& g, const TensorView& packed) {
  const Shape s = check(qx, qweight, out, g);
  check_dtype(packed, DType::kUInt8, "packed");
  check_contiguous(packed, "packed");
  TS_CHECK_VALUE(cpu::onednn_usable(), "conv_int8_pack: oneDNN is not usable in this process");
  cpu::OneDnn& eng = cpu::onednn();
  std::lock_guard<std::mutex> lock(eng.mu);
  const Entry& e = entry_for(s, without_epilogue(g));
  TS_CHECK_VALUE(e.ok, "conv_int8_pack: oneDNN has no int8 convolution for this shape");
  TS_CHECK_VALUE(packed.numel() == static_cast<int64_t>(e.wei.get_size()),
                 "conv_int8_pack: packed has " + std::to_string(packed.numel()) + " bytes, expected " +
                     std::to_string(e.wei.get_size()));
  dims w = g.groups > 1 ? dims{g.groups, s.OC / g.groups, s.C / g.groups} : dims{s.OC, s.C};
  w.insert(w.end(), s.k.begin(), s.k.end());
  const tag plain = g.groups > 1 ? (s.sp == 1 ? tag::goiw : tag::goihw) : (s.sp == 1 ? tag::oiw : tag::oihw);
  dnnl::memory src({w, dt::s8, plain}, eng.engine, qweight.data);
  dnnl::memory dst(e.wei, eng.engine, packed.data);
  dnnl::reorder(src, dst).execute(eng.stream, src, dst);
  eng.stream.wait();
}

bool conv_int8_run(const TensorView& qx, const TensorView& qweight, const TensorView& packed,
                   const TensorView& w_scales, const TensorView* bias, float act_scale,
                   int32_t zero_point, const TensorView& out, const ConvInt8Geometry& g,
                   const TensorView* residual) {
  const Shape s = check(qx, qweight, out, g);
  // oneDNN reads these through their data pointers alone: each must be dense
  check_dtype(packed, DType::kUInt8, "packed");
  check_contiguous(packed, "packed");
  check_dtype(w_scales, DType::kFloat32, "w_scales");
  check_contiguous(w_scales, "w_scales");
  TS_CHECK_VALUE(w_scales.numel() == s.OC, "conv_int8: w_scales must have one value per output channel");
  TS_CHECK_VALUE(g.has_bias == (bias != nullptr), "conv_int8: has_bias does not match the bias argument");
  if (bias) {
    check_dtype(*bias, DType::kFloat32, "bias");
    check_contiguous(*bias, "bias");
    TS_CHECK_VALUE(bias->numel() == s.OC, "conv_int8: bias must have one value per output channel");
  }
  TS_CHECK_VALUE(g.has_zero_point || zero_point == 0, "conv_int8: zero_point given without has_zero_point");
  TS_CHECK_VALUE(g.has_residual == (residual != nullptr), "conv_int8: has_residual does not match the residual argument");
  if (residual) {
    check_dtype(*residual, DType::kFloat32, "residual");
    check_contiguous(*residual, "residual");
    TS_CHECK_VALUE(residual->ndim == out.ndim && std::equal(out.shape, out.shape + out.ndim, residual->shape),
                   "conv_int8: residual must have the output's shape " + shape_str(out) + ", got " +
                       shape_str(*residual));
  }
  if (!cpu::onednn_usable()) return false;
  cpu::OneDnn& eng = cpu::onednn();
  std::lock_guard<std::mutex> lock(eng.mu);
  // The weights were packed for the kernel without the epilogue: this one must read that
  // layout. Looked up first and copied: a lookup may clear the cache (entry_for), which
  // would leave a reference taken before it dangling.
  dnnl::memory::desc packed_layout;
  if (has_epilogue(g)) packed_layout = entry_for(s, without_epilogue(g)).wei;
  const Entry& e = entry_for(s, g);
  if (!e.ok) return false;
  TS_CHECK_VALUE(packed.numel() == static_cast<int64_t>(e.wei.get_size()),
                 "conv_int8: packed weights do not match this shape (pack them for it)");
  if (has_epilogue(g) && !(e.wei == packed_layout)) return false;
  float a_scale = act_scale;
  int32_t zp = zero_point;
  std::unordered_map<int, dnnl::memory> args = {
      {DNNL_ARG_SRC, dnnl::memory(e.src, eng.engine, qx.data)},
      {DNNL_ARG_WEIGHTS, dnnl::memory(e.wei, eng.engine, packed.data)},
      {DNNL_ARG_DST, dnnl::memory(e.dst, eng.engine, out.data)},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, dnnl::memory(e.scalar_f32, eng.engine, &a_scale)},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, dnnl::memory(e.wscales, eng.engine, w_scales.data)},
  };
  if (g.has_zero_point)
    args[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC] = dnnl::memory(e.scalar_s32, eng.engine, &zp);
  if (bias) args[DNNL_ARG_BIAS] = dnnl::memory(e.bias, eng.engine, bias->data);
  if (residual)
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = dnnl::memory(e.dst, eng.engine, residual->data);
  e.prim.execute(eng.stream, args);
  eng.stream.wait();
  return true;
}

}  // namespace tensorslim
