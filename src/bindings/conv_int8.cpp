// INT8 convolution (see include/tensorslim/conv_int8.h).
#include <pybind11/stl.h>

#include <string>

#include "../cpu/onednn_int8_exact.h"
#include "tensorslim/conv_int8.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {
namespace {

ConvInt8Geometry geometry(std::vector<int64_t> stride, std::vector<int64_t> padding,
                          std::vector<int64_t> dilation, int64_t groups, bool has_zp, bool has_bias) {
  ConvInt8Geometry g;
  g.stride = std::move(stride);
  g.padding = std::move(padding);
  g.dilation = std::move(dilation);
  g.groups = groups;
  g.has_zero_point = has_zp;
  g.has_bias = has_bias;
  return g;
}

ConvActivation conv_activation(const std::string& name) {
  if (name.empty()) return ConvActivation::kNone;
  if (name == "relu") return ConvActivation::kReLU;
  if (name == "relu6") return ConvActivation::kReLU6;
  if (name == "silu") return ConvActivation::kSiLU;
  if (name == "gelu") return ConvActivation::kGELU;
  throw py::value_error("conv_int8: activation must be '', 'relu', 'relu6', 'silu' or 'gelu', got '" + name + "'");
}

// What both run bindings pass on besides the input: weights, scales, bias, output, geometry
// with its epilogue (residual add, activation).
struct RunArgs {
  TensorView qweight, packed, w_scales, out;
  OptionalView bias, residual;
  ConvInt8Geometry g;
};

RunArgs run_args(py::handle qweight, py::handle packed, py::handle w_scales, py::handle bias, py::handle out,
                 std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                 int64_t groups, int32_t zp, py::handle residual, const std::string& activation) {
  RunArgs r{to_view(qweight, "qweight"), to_view(packed, "packed"), to_view(w_scales, "w_scales"),
            to_view(out, "out"), to_optional_view(bias, "bias"), to_optional_view(residual, "residual"), {}};
  r.g = geometry(std::move(stride), std::move(padding), std::move(dilation), groups, zp != 0, r.bias.present);
  r.g.has_residual = r.residual.present;
  r.g.activation = conv_activation(activation);
  return r;
}

}  // namespace

void register_conv_int8(py::module_& m) {
  m.def("conv_int8_impl", [](py::handle qx, py::handle qweight, py::handle out, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                             bool has_zp, bool has_bias) {
    TensorView xv = to_view(qx, "qx"), wv = to_view(qweight, "qweight"), ov = to_view(out, "out");
    return conv_int8_impl(xv, wv, ov, geometry(stride, padding, dilation, groups, has_zp, has_bias));
  }, "oneDNN's implementation name for this int8 convolution ('' if none).");
  m.def("onednn_int8_is_exact", &cpu::onednn_int8_is_exact,
        "Whether the oneDNN kernel with this implementation name sums u8 x s8 products exactly "
        "(VNNI, AVX10 or AMX) rather than in saturating int16 pairs.");
  m.def("conv_int8_packed_bytes", [](py::handle qx, py::handle qweight, py::handle out,
                                     std::vector<int64_t> stride, std::vector<int64_t> padding,
                                     std::vector<int64_t> dilation, int64_t groups, bool has_zp,
                                     bool has_bias) {
    TensorView xv = to_view(qx, "qx"), wv = to_view(qweight, "qweight"), ov = to_view(out, "out");
    return conv_int8_packed_bytes(xv, wv, ov, geometry(stride, padding, dilation, groups, has_zp, has_bias));
  });
  m.def("conv_int8_pack", [](py::handle qx, py::handle qweight, py::handle out, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                             bool has_zp, bool has_bias, py::handle packed) {
    TensorView xv = to_view(qx, "qx"), wv = to_view(qweight, "qweight"), ov = to_view(out, "out"),
               pv = to_view(packed, "packed");
    const ConvInt8Geometry g = geometry(stride, padding, dilation, groups, has_zp, has_bias);
    py::gil_scoped_release release;
    conv_int8_pack(xv, wv, ov, g, pv);
  });
  m.def("conv_int8_run", [](py::handle qx, py::handle qweight, py::handle packed, py::handle w_scales,
                            py::handle bias, float act_scale, int32_t zp, py::handle out,
                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation, int64_t groups, py::handle residual,
                            const std::string& activation) {
    const TensorView xv = to_view(qx, "qx");
    const RunArgs r = run_args(qweight, packed, w_scales, bias, out, stride, padding, dilation, groups, zp,
                               residual, activation);
    py::gil_scoped_release release;
    return conv_int8_run(xv, r.qweight, r.packed, r.w_scales, r.bias.get(), act_scale, zp, r.out, r.g,
                         r.residual.get());
  }, "Runs the int8 convolution, then out += residual (a view or None) and the activation ('', 'relu', "
     "'relu6', 'silu' or 'gelu'); False when oneDNN has no implementation for it.");
  m.def("conv_int8_quantizing_run", [](py::handle x, float act_scale, int32_t zp, int32_t code_max,
                                       py::handle qweight, py::handle packed, py::handle w_scales, py::handle bias,
                                       py::handle out, std::vector<int64_t> stride, std::vector<int64_t> padding,
                                       std::vector<int64_t> dilation, int64_t groups, py::handle residual,
                                       const std::string& activation) {
    const TensorView xv = to_view(x, "x");
    const RunArgs r = run_args(qweight, packed, w_scales, bias, out, stride, padding, dilation, groups, zp,
                               residual, activation);
    py::gil_scoped_release release;
    return conv_int8_quantizing_run(xv, act_scale, zp, code_max, r.qweight, r.packed, r.w_scales, r.bias.get(),
                                    r.out, r.g, r.residual.get());
  }, "Quantizes fp32 channels-last x (static scale / zero point, codes capped at code_max) and runs the "
     "int8 convolution on the codes with conv_int8_run's epilogue; False when oneDNN has no implementation "
     "for it.");
}

}  // namespace bindings
}  // namespace tensorslim
