// CPU binary / ternary / XNOR linears (see include/tensorslim/binary.h).
#include <string>

#include "tensorslim/binary.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {
namespace {

using LinearFn = void (*)(const TensorView&, const TensorView&, const TensorView&,
                          const TensorView*, const TensorView&, GemmBackend);

void def_linear(py::module_& m, const char* name, LinearFn fn, const char* doc) {
  m.def(name, [fn](py::handle x, py::handle w, py::handle scales, py::handle bias, py::handle out,
                   int backend) {
    TensorView xv = to_view(x, "x"), wv = to_view(w, "qweight"), sv = to_view(scales, "scales"),
               ov = to_view(out, "out");
    OptionalView bv = to_optional_view(bias, "bias");
    const GemmBackend be = to_backend(backend);
    py::gil_scoped_release release;
    fn(xv, wv, sv, bv.get(), ov, be);
  }, doc);
}

}  // namespace

void register_binary(py::module_& m) {
  def_linear(m, "linear_binary", &linear_binary, "y = scale * (x @ sign(w).T) + bias");
  def_linear(m, "linear_xnor", &linear_xnor, "XNOR-popcount linear (binary activations and weights)");
  def_linear(m, "linear_ternary", &linear_ternary, "y = scale * (x @ t.T) + bias, t in {-1, 0, 1}");
  m.def("binarize_rows", [](py::handle x, py::handle bits, py::handle scales) {
    TensorView xv = to_view(x, "x"), bv = to_view(bits, "bits"), sv = to_view(scales, "scales");
    py::gil_scoped_release release;
    binarize_rows(xv, bv, sv);
  }, "Sign bits and mean |x| of each row (the activation side of linear_xnor).");
  m.def("xnor_dots", [](py::handle a, py::handle w, int64_t K, py::handle dots, int backend) {
    TensorView av = to_view(a, "a_bits"), wv = to_view(w, "w_bits"), dv = to_view(dots, "dots");
    const GemmBackend be = to_backend(backend);
    py::gil_scoped_release release;
    xnor_dots(av, wv, K, dv, be);
  }, "K - 2 * popcount(a XOR w) for every pair of rows.");
  m.def("has_vpopcntdq", &cpu::has_vpopcntdq);
  m.def("set_vpopcntdq_enabled", &cpu::set_vpopcntdq_enabled,
        "Tests force the VPSHUFB popcount on CPUs that have VPOPCNTDQ.");
}

}  // namespace bindings
}  // namespace tensorslim
