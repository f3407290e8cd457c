#include "views.h"

#include <string>

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

TensorView to_view(const py::handle& obj, const char* what) {
  auto bad = [&](const std::string& why) {
    return TypeError(std::string(what) + ": not a tensor view (" + why + ")");
  };
  if (!py::isinstance<py::tuple>(obj)) throw bad("expected a tuple");
  py::tuple t = py::reinterpret_borrow<py::tuple>(obj);
  // An 8th field, when there, is the tensor itself: it keeps the memory alive, unread here.
  if (t.size() != 7 && t.size() != 8) throw bad("expected 7 or 8 fields");
  TensorView v;
  v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  const int code = t[1].cast<int>();
  if (code < 0 || code > static_cast<int>(DType::kFloat64)) throw bad("unknown dtype code");
  v.dtype = static_cast<DType>(code);
  py::tuple shape = t[2].cast<py::tuple>(), strides = t[3].cast<py::tuple>();
  if (shape.size() != strides.size() || shape.size() > kMaxDims) throw bad("bad shape/strides");
  v.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = shape[i].cast<int64_t>();
    v.strides[i] = strides[i].cast<int64_t>();
  }
  v.device = static_cast<DeviceType>(t[4].cast<int>());
  v.device_index = t[5].cast<int>();
  v.stream = reinterpret_cast<void*>(t[6].cast<uintptr_t>());
  return v;
}

Format to_format(int id) {
  TS_CHECK_VALUE(id >= 0 && id < kNumFormats, "unknown format id " + std::to_string(id));
  return static_cast<Format>(id);
}

GemmBackend to_backend(int id) {
  TS_CHECK_VALUE(id >= 0 && id <= 3, "unknown backend id " + std::to_string(id));
  return static_cast<GemmBackend>(id);
}

OptionalView to_optional_view(const py::handle& obj, const char* what) {
  OptionalView o;
  if (!obj.is_none()) {
    o.view = to_view(obj, what);
    o.present = true;
  }
  return o;
}

}  // namespace bindings
}  // namespace tensorslim
