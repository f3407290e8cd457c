// W4A8: INT4 weights x per-token INT8 activations (see include/tensorslim/gemm_w4a8.h).
#include "tensorslim/gemm_w4a8.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

void register_w4a8(py::module_& m) {
  m.def("linear_w4a8", [](py::handle x, py::handle qweight, py::handle scales, py::handle zps,
                          py::handle bias, int fmt, int64_t group, py::handle out, int backend) {
    TensorView xv = to_view(x, "x"), wv = to_view(qweight, "qweight"),
               sv = to_view(scales, "scales"), ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), bv = to_optional_view(bias, "bias");
    const GemmBackend be = to_backend(backend);
    const Format f = to_format(fmt);
    py::gil_scoped_release release;
    linear_w4a8(xv, wv, sv, zv.get(), bv.get(), f, group, ov, be);
  });
  m.def("linear_w4a8_kernel", &linear_w4a8_kernel,
        "The kernel linear_w4a8 runs for (K, group_size): avx512_vnni, avx512bw or reference.");
}

}  // namespace bindings
}  // namespace tensorslim
