// Every row of the format table, its scalar reference conversions, and (lowbit.h)
// quantize / dequantize / linear for any row.
#include <pybind11/stl.h>

#include <string>

#include "tensorslim/formats.h"
#include "tensorslim/lowbit.h"
#ifdef TENSORSLIM_WITH_CUDA
#include "tensorslim/lowbit_cuda.h"
#endif
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {
namespace {

const char* scale_format_name(ScaleFormat s) {
  switch (s) {
    case ScaleFormat::kE4M3: return "e4m3";
    case ScaleFormat::kE8M0: return "e8m0";
    default: return "float32";
  }
}

const FormatInfo& row_by_id(int id) {
  const FormatInfo* f = find_format_id(id);
  TS_CHECK_VALUE(f != nullptr, "unknown format id " + std::to_string(id));
  return *f;
}

py::list rows() {
  py::list out;
  for (int i = 0; i < kNumFormatRows; ++i) {
    const FormatInfo& f = format_table()[i];
    py::dict d;
    d["id"] = static_cast<int>(f.format);
    d["name"] = f.name;
    d["bits"] = f.bits;
    d["has_zero_point"] = f.has_zero_point;
    d["qmin"] = f.qmin;
    d["qmax"] = f.qmax;
    d["scale_divisor"] = f.scale_divisor;
    d["block_size"] = f.block_size;
    d["scale_format"] = scale_format_name(f.scale_format);
    d["is_float"] = f.is_float;
    d["exp_bits"] = f.exp_bits;
    d["man_bits"] = f.man_bits;
    d["max_value"] = f.max_value;
    d["has_tensor_scale"] = f.has_tensor_scale;
    py::list values;
    if (f.code_values)
      for (int c = 0; c < (1 << f.bits); ++c) values.append(f.code_values[c]);
    d["code_values"] = values;
    out.append(d);
  }
  return out;
}

}  // namespace

void register_lowbit(py::module_& m) {
  m.def("format_rows", &rows, "Every row of the C++ format table, with the low-bit fields.");
  m.def("format_row_encode", [](int id, float x, float scale, int zp) {
    return row_by_id(id).encode(x, scale, zp);
  }, "Reference encoding of one value by any row.");
  m.def("format_row_decode", [](int id, int code, float scale, int zp) {
    return row_by_id(id).decode(code, scale, zp);
  }, "Reference decoding of one code by any row.");
  m.def("format_row_bytes_per_block", [](int id, int64_t group) {
    return bytes_per_block(row_by_id(id), group);
  });
  m.def("e4m3_encode", &e4m3_encode);
  m.def("e4m3_decode", &e4m3_decode);
  m.def("e5m2_encode", &e5m2_encode);
  m.def("e5m2_decode", &e5m2_decode);
  m.def("e2m1_encode", &e2m1_encode);
  m.def("e2m1_decode", &e2m1_decode);
  m.def("e8m0_from_exponent", &e8m0_from_exponent);
  m.def("e8m0_decode", &e8m0_decode);

  m.def("quantize_lowbit", [](py::handle x, int fmt, int64_t group, py::handle q,
                              py::handle scales, py::handle zps, py::handle ts) {
    TensorView xv = to_view(x, "x"), qv = to_view(q, "q"), sv = to_view(scales, "scales");
    OptionalView zv = to_optional_view(zps, "zero_points"), tv = to_optional_view(ts, "tensor_scale");
    const Format f = row_by_id(fmt).format;
    py::gil_scoped_release release;
    quantize_lowbit(xv, f, group, qv, sv, zv.get(), tv.get());
  });
  m.def("dequantize_lowbit", [](py::handle q, py::handle scales, py::handle zps, py::handle ts,
                                int fmt, int64_t group, py::handle out) {
    TensorView qv = to_view(q, "q"), sv = to_view(scales, "scales"), ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), tv = to_optional_view(ts, "tensor_scale");
    const Format f = row_by_id(fmt).format;
    py::gil_scoped_release release;
    dequantize_lowbit(qv, sv, zv.get(), tv.get(), f, group, ov);
  });
  m.def("lowbit_gemv_max_rows", &lowbit_gemv_max_rows,
        "Batch up to which linear_lowbit runs its fused GEMV (above it the panel GEMM, or on "
        "the scalar path decode + sgemm in a workspace).");
  m.def("linear_lowbit", [](py::handle x, py::handle qw, py::handle scales, py::handle zps,
                            py::handle ts, py::handle bias, int fmt, int64_t group,
                            py::handle out, py::handle workspace, int backend) {
    TensorView xv = to_view(x, "x"), wv = to_view(qw, "qweight"), sv = to_view(scales, "scales"),
               ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), tv = to_optional_view(ts, "tensor_scale"),
                 bv = to_optional_view(bias, "bias"), wsv = to_optional_view(workspace, "workspace");
    const GemmBackend be = to_backend(backend);
    const Format f = row_by_id(fmt).format;
    py::gil_scoped_release release;
    linear_lowbit(xv, wv, sv, zv.get(), tv.get(), bv.get(), f, group, ov, wsv.get(), be);
  });

#ifdef TENSORSLIM_WITH_CUDA
  m.def("cuda_dequantize_lowbit", [](py::handle q, py::handle scales, py::handle zps,
                                     py::handle ts, int fmt, int64_t group, py::handle out) {
    TensorView qv = to_view(q, "q"), sv = to_view(scales, "scales"), ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), tv = to_optional_view(ts, "tensor_scale");
    const Format f = row_by_id(fmt).format;
    py::gil_scoped_release release;
    cuda::dequantize_lowbit(qv, sv, zv.get(), tv.get(), f, group, ov);
  });
  m.def("cuda_linear_lowbit", [](py::handle x, py::handle qw, py::handle scales, py::handle zps,
                                 py::handle ts, py::handle bias, int fmt, int64_t group,
                                 py::handle out) {
    TensorView xv = to_view(x, "x"), wv = to_view(qw, "qweight"), sv = to_view(scales, "scales"),
               ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), tv = to_optional_view(ts, "tensor_scale"),
                 bv = to_optional_view(bias, "bias");
    const Format f = row_by_id(fmt).format;
    py::gil_scoped_release release;
    cuda::linear_lowbit(xv, wv, sv, zv.get(), tv.get(), bv.get(), f, group, ov);
  });
#endif
}

}  // namespace bindings
}  // namespace tensorslim
