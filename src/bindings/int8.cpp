// W8A8: activation quantizers and the INT8 GEMM (see include/tensorslim/gemm_int8.h).
#include <vector>

#include "tensorslim/gemm_int8.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

void register_int8(py::module_& m) {
  m.def("quantize_per_token", [](py::handle x, py::handle inv_smooth, py::handle q,
                                 py::handle scales, int backend) {
    TensorView xv = to_view(x, "x"), qv = to_view(q, "q"), sv = to_view(scales, "scales");
    OptionalView iv = to_optional_view(inv_smooth, "inv_smooth");
    const GemmBackend b = to_backend(backend);
    py::gil_scoped_release release;
    quantize_per_token(xv, iv.get(), qv, sv, b);
  });
  m.def("quantize_static", [](py::handle x, py::handle inv_smooth, float scale, int32_t zp,
                              py::handle q, int backend) {
    TensorView xv = to_view(x, "x"), qv = to_view(q, "q");
    OptionalView iv = to_optional_view(inv_smooth, "inv_smooth");
    const GemmBackend b = to_backend(backend);
    py::gil_scoped_release release;
    quantize_static(xv, iv.get(), scale, zp, qv, b);
  });
  m.def("linear_int8", [](py::handle qx, py::handle act_scales, int32_t zp, py::handle qweight,
                          py::handle w_scales, py::handle bias, py::handle out, int backend,
                          py::handle packed) {
    TensorView xv = to_view(qx, "qx"), av = to_view(act_scales, "act_scales"),
               wv = to_view(qweight, "qweight"), sv = to_view(w_scales, "w_scales"),
               ov = to_view(out, "out");
    OptionalView bv = to_optional_view(bias, "bias"), pv = to_optional_view(packed, "packed");
    const GemmBackend b = to_backend(backend);
    py::gil_scoped_release release;
    linear_int8(xv, av, zp, wv, sv, bv.get(), ov, b, pv.get());
  });
  // W8A8 in one crossing from Python (the eager path of ops.linear_w8a8): the same
  // quantize_per_token / quantize_static and linear_int8, the codes in scratch memory; a
  // separate call each cost ~30 us more per layer in Python than these kernels take at
  // MiniLM's batch-1 shapes. act_scale None: per token (uint8 codes, zero point 128); else
  // static codes with act_zero_point, uint8 or int8 as act_unsigned says.
  m.def("linear_w8a8", [](py::handle x, py::handle inv_smooth, py::handle qweight,
                          py::handle w_scales, py::handle bias, py::handle out, int backend,
                          py::handle packed, py::object act_scale, int32_t act_zero_point,
                          bool act_unsigned) {
    TensorView xv = to_view(x, "x"), wv = to_view(qweight, "qweight"),
               sv = to_view(w_scales, "w_scales"), ov = to_view(out, "out");
    OptionalView iv = to_optional_view(inv_smooth, "inv_smooth"), bv = to_optional_view(bias, "bias"),
                 pv = to_optional_view(packed, "packed");
    const GemmBackend b = to_backend(backend);
    TS_CHECK_VALUE(xv.ndim == 2, "x: expected a 2-D [tokens, features] tensor, got " + shape_str(xv));
    const bool per_token = act_scale.is_none();
    const float static_scale = per_token ? 1.0f : act_scale.cast<float>();
    py::gil_scoped_release release;
    thread_local std::vector<uint8_t> codes;
    thread_local std::vector<float> scales;
    codes.resize(static_cast<size_t>(xv.numel()));
    scales.resize(per_token ? static_cast<size_t>(xv.shape[0]) : 1);
    TensorView qv, av;
    qv.data = codes.data();
    qv.dtype = per_token || act_unsigned ? DType::kUInt8 : DType::kInt8;
    qv.ndim = 2;
    qv.shape[0] = xv.shape[0];
    qv.shape[1] = xv.shape[1];
    qv.strides[0] = xv.shape[1];
    qv.strides[1] = 1;
    av.data = scales.data();
    av.ndim = 1;
    av.shape[0] = static_cast<int64_t>(scales.size());
    av.strides[0] = 1;
    if (per_token) {
      quantize_per_token(xv, iv.get(), qv, av, b);
      linear_int8(qv, av, 128, wv, sv, bv.get(), ov, b, pv.get());
    } else {
      scales[0] = static_scale;
      quantize_static(xv, iv.get(), static_scale, act_zero_point, qv, b);
      linear_int8(qv, av, act_zero_point, wv, sv, bv.get(), ov, b, pv.get());
    }
  });
  m.def("linear_int8_packed_bytes", &linear_int8_packed_bytes,
        "Bytes of [N, K] int8 weights in the packed layout for the active ISA (0: none).");
  m.def("linear_int8_packing_pays", &linear_int8_packing_pays,
        "Whether layers keep the packed copy (false on AMX: oneDNN reads plain weights faster).");
  m.def("linear_int8_packed_layout", &linear_int8_packed_layout,
        "The packed layout for [N, K] int8 weights under the active ISA: 'vnni_panels', 'onednn', "
        "'avx2_panels' or 'none'.");
  m.def("linear_int8_pack", [](py::handle qweight, py::handle packed) {
    TensorView wv = to_view(qweight, "qweight"), pv = to_view(packed, "packed");
    py::gil_scoped_release release;
    linear_int8_pack(wv, pv);
  });
  m.def("linear_int8_onednn_impl", [](py::handle qx, py::handle act_scales, int32_t zp,
                                      py::handle qweight, py::handle w_scales, py::handle bias,
                                      py::handle out, py::handle packed) {
    TensorView xv = to_view(qx, "qx"), av = to_view(act_scales, "act_scales"),
               wv = to_view(qweight, "qweight"), sv = to_view(w_scales, "w_scales"),
               ov = to_view(out, "out");
    OptionalView bv = to_optional_view(bias, "bias"), pv = to_optional_view(packed, "packed");
    return cpu::linear_int8_onednn_impl(xv, av, zp, wv, sv, bv.get(), ov, pv.get());
  }, "The oneDNN implementation linear_int8 would run for these arguments ('' if none).");
}

}  // namespace bindings
}  // namespace tensorslim
