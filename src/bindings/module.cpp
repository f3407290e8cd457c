// The extension module tensorslim._C. It knows nothing of torch: tensors arrive as
// views (see views.h); C++ errors become ValueError / TypeError / RuntimeError.
#include <pybind11/pybind11.h>

#include "../cpu/parallel.h"
#include "views.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "tensorslim native core";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const tensorslim::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const tensorslim::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("num_threads", &tensorslim::cpu::num_threads);
  m.def("set_num_threads", &tensorslim::cpu::set_num_threads);
  m.def("use_host_openmp", [](const std::string& path) {
    return tensorslim::cpu::use_host_openmp(path.c_str());
  }, "Run parallel regions on the host's already-loaded OpenMP runtime ('' = own pool).");
  m.def("threading_backend", &tensorslim::cpu::threading_backend);
  m.def("built_with_onednn", [] {
#ifdef TENSORSLIM_WITH_ONEDNN
    return true;
#else
    return false;
#endif
  }, "Whether this build links oneDNN (its wheels are x86-64 only: not on ARM builds).");
  m.def("in_forked_child", &tensorslim::cpu::in_forked_child,
        "Whether this process is a fork() child (where the host's OpenMP team cannot run).");
  tensorslim::bindings::register_quantize(m);
  tensorslim::bindings::register_cuda(m);
  tensorslim::bindings::register_lowbit(m);
  tensorslim::bindings::register_calibration(m);
  tensorslim::bindings::register_binary(m);
  tensorslim::bindings::register_int8(m);
  tensorslim::bindings::register_w4a8(m);
  tensorslim::bindings::register_lowrank(m);
  tensorslim::bindings::register_distill(m);
  tensorslim::bindings::register_prune(m);
  tensorslim::bindings::register_sparse(m);
  tensorslim::bindings::register_conv_int8(m);
}
