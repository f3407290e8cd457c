// W4A8: INT4 weights x per-token INT8 activations (see include/tensorslim/gemm_w4a8.h).
#include "tensorslim/gemm_w4a8.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

void register_w4a8(py::module_& m) {
  m.def("linear_w4a8", [](py::handle x, py::handle qweight, py::handle scales, py::handle zps,
                          py::handle bias, int fmt, int64_t group, py::handle out, int backend,
                          py::handle packed) {
    TensorView xv = to_view(x, "x"), wv = to_view(qweight, "qweight"),
               sv = to_view(scales, "scales"), ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), bv = to_optional_view(bias, "bias"),
                 pv = to_optional_view(packed, "packed");
    const GemmBackend be = to_backend(backend);
    const Format f = to_format(fmt);
    py::gil_scoped_release release;
    linear_w4a8(xv, wv, sv, zv.get(), bv.get(), f, group, ov, be, pv.get());
  }, py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zero_points"), py::arg("bias"),
     py::arg("fmt"), py::arg("group_size"), py::arg("out"), py::arg("backend"), py::arg("packed") = py::none());
  m.def("linear_w4a8_packed_bytes", [](int64_t N, int64_t K, int64_t group, int fmt) {
    return linear_w4a8_packed_bytes(N, K, group, to_format(fmt));
  }, "Bytes of linear_w4a8_pack's copy of [N, K] weights (0: none for this shape).");
  m.def("linear_w4a8_pack", [](py::handle qweight, py::handle scales, py::handle zps, int fmt, int64_t K,
                               int64_t group, py::handle packed) {
    TensorView wv = to_view(qweight, "qweight"), sv = to_view(scales, "scales"), pv = to_view(packed, "packed");
    OptionalView zv = to_optional_view(zps, "zero_points");
    const Format f = to_format(fmt);
    py::gil_scoped_release release;
    linear_w4a8_pack(wv, sv, zv.get(), f, K, group, pv);
  });
  m.def("linear_w4a8_packing_pays", &linear_w4a8_packing_pays,
        "Whether the active ISA has a native kernel, which would read a packed copy.");
  m.def("linear_w4a8_kernel", &linear_w4a8_kernel,
        "The kernel linear_w4a8 runs for (K, group_size): avx512_vnni, avx512bw or reference.");
}

}  // namespace bindings
}  // namespace tensorslim
