// Python-side tensors arrive as plain tuples built by tensorslim/_views.py:
// (data_ptr, dtype code, shape, strides, device type, device index, stream).
#pragma once

#include <pybind11/pybind11.h>

#include "tensorslim/formats.h"
#include "tensorslim/gemm.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace bindings {

TensorView to_view(const pybind11::handle& obj, const char* what);

// A view, or none for a Python None (optional tensors such as bias).
struct OptionalView {
  TensorView view;
  bool present = false;
  const TensorView* get() const { return present ? &view : nullptr; }
};
OptionalView to_optional_view(const pybind11::handle& obj, const char* what);

// A format id from Python, checked against the table.
Format to_format(int id);

// A backend id from Python (ops.BACKENDS: auto, reference, native, onednn), checked.
GemmBackend to_backend(int id);

void register_quantize(pybind11::module_& m);
void register_cuda(pybind11::module_& m);
void register_lowbit(pybind11::module_& m);
void register_calibration(pybind11::module_& m);
void register_binary(pybind11::module_& m);
void register_int8(pybind11::module_& m);
void register_w4a8(pybind11::module_& m);
void register_lowrank(pybind11::module_& m);
void register_distill(pybind11::module_& m);
void register_prune(pybind11::module_& m);
void register_sparse(pybind11::module_& m);
void register_conv_int8(pybind11::module_& m);

}  // namespace bindings
}  // namespace tensorslim
