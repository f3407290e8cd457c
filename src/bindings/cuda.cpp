// CUDA quantize / dequantize / weight-only linear for _C, built with the CUDA kernels
// (cuda_none.cpp stands in without them). Views carry torch's current stream.
#include <string>

#include "tensorslim/cuda.h"
#include "tensorslim/formats.h"
#include "tensorslim/status.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {
namespace {

// The CUDA kernels take groups of one size: a short last group (group_size not dividing the
// row) is refused here; ops/weight_only.py runs such layers with its PyTorch reference.
void check_whole_groups(int64_t cols, int64_t group) {
  TS_CHECK_VALUE(group <= 0 || group >= cols || cols % group == 0,
                 "CUDA kernels need group_size " + std::to_string(group) +
                     " to divide the row length " + std::to_string(cols) +
                     " (a short last group runs on the CPU or with backend='reference')");
}

}  // namespace

void register_cuda(py::module_& m) {
  m.attr("has_cuda") = true;

  m.def("cuda_device_count", [] {
    py::gil_scoped_release release;
    return cuda::device_count();
  }, "Number of CUDA devices the runtime sees (0 without a driver).");

  m.def("cuda_quantize", [](py::handle x, int fmt, int64_t group, py::handle q, py::handle scales,
                            py::handle zps) {
    TensorView xv = to_view(x, "x"), qv = to_view(q, "q"), sv = to_view(scales, "scales");
    OptionalView zv = to_optional_view(zps, "zero_points");
    const Format f = to_format(fmt);
    if (xv.ndim == 2) check_whole_groups(xv.shape[1], group);
    py::gil_scoped_release release;
    cuda::quantize(xv, f, group, qv, sv, zv.get());
  });
  m.def("cuda_dequantize", [](py::handle q, py::handle scales, py::handle zps, int fmt,
                              int64_t group, py::handle out) {
    TensorView qv = to_view(q, "q"), sv = to_view(scales, "scales"), ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points");
    const Format f = to_format(fmt);
    if (ov.ndim == 2) check_whole_groups(ov.shape[1], group);
    py::gil_scoped_release release;
    cuda::dequantize(qv, sv, zv.get(), f, group, ov);
  });
  m.def("cuda_linear_weight_only", [](py::handle x, py::handle qw, py::handle scales,
                                      py::handle zps, py::handle bias, int fmt, int64_t group,
                                      py::handle out, py::handle workspace) {
    TensorView xv = to_view(x, "x"), wv = to_view(qw, "qweight"), sv = to_view(scales, "scales"),
               ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), bv = to_optional_view(bias, "bias"),
                 ws = to_optional_view(workspace, "workspace");
    const Format f = to_format(fmt);
    if (xv.ndim == 2) check_whole_groups(xv.shape[1], group);
    py::gil_scoped_release release;
    cuda::linear_weight_only(xv, wv, sv, zv.get(), bv.get(), f, group, ov, ws.get());
  });
}

}  // namespace bindings
}  // namespace tensorslim
