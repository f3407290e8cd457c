// CPU quantize / dequantize / weight-only linear, and the format table.
#include <pybind11/stl.h>

#include "../cpu/onednn_usable.h"
#include "tensorslim/formats.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

void register_quantize(py::module_& m) {
  m.def("format_encode", [](int id, float x, float scale, int zp) {
    return format_info(to_format(id)).encode(x, scale, zp);
  }, "Reference encoding of one value.");
  m.def("format_decode", [](int id, int code, float scale, int zp) {
    return format_info(to_format(id)).decode(code, scale, zp);
  }, "Reference decoding of one code.");
  m.def("bytes_per_block", [](int id, int64_t group) {
    return bytes_per_block(format_info(to_format(id)), group);
  });

  m.def("quantize", [](py::handle x, int fmt, int64_t group, py::handle q, py::handle scales,
                       py::handle zps) {
    TensorView xv = to_view(x, "x"), qv = to_view(q, "q"), sv = to_view(scales, "scales");
    OptionalView zv = to_optional_view(zps, "zero_points");
    py::gil_scoped_release release;
    quantize(xv, to_format(fmt), group, qv, sv, zv.get());
  });
  m.def("dequantize", [](py::handle q, py::handle scales, py::handle zps, int fmt, int64_t group,
                         py::handle out) {
    TensorView qv = to_view(q, "q"), sv = to_view(scales, "scales"), ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points");
    py::gil_scoped_release release;
    dequantize(qv, sv, zv.get(), to_format(fmt), group, ov);
  });
  m.def("set_activation_pieces_enabled", &cpu::set_activation_pieces_enabled,
        "Tests and benchmarks run integer weight-only at a few rows on the float kernels "
        "instead of the activation-pieces kernels (AVX-512 VNNI, AVX2; also N:M int8 / int4 sparse linears).");
  m.def("activation_pieces_enabled", &cpu::activation_pieces_enabled,
        "Whether the activation-pieces kernels run where they take the problem (set_activation_pieces_enabled).");
  m.def("pieces_rows", [](int fmt) {
    const cpu::PiecesRows rows = cpu::pieces_rows(to_format(fmt));
    return py::make_tuple(rows.fewest, rows.most);
  }, "(fewest, most) activation rows the active ISA's pieces kernel takes this format at on this "
     "CPU (more than one from K = 2048; (0, 0): none). They differ by CPU kind: docs/benchmarks.md.");
  m.def("linear_weight_only", [](py::handle x, py::handle qw, py::handle scales, py::handle zps,
                                 py::handle bias, int fmt, int64_t group, py::handle out,
                                 int backend) {
    TensorView xv = to_view(x, "x"), wv = to_view(qw, "qweight"), sv = to_view(scales, "scales"),
               ov = to_view(out, "out");
    OptionalView zv = to_optional_view(zps, "zero_points"), bv = to_optional_view(bias, "bias");
    const GemmBackend be = to_backend(backend);
    py::gil_scoped_release release;
    linear_weight_only(xv, wv, sv, zv.get(), bv.get(), to_format(fmt), group, ov, be);
  });

  m.def("onednn_weight_only_uses_amx", &cpu::onednn_weight_only_uses_amx,
        "Whether oneDNN's weight-decompression matmul runs AMX tiles on this CPU: there `auto` "
        "weight-only linears take it from 16 rows of bf16 activations and 128 / 256 of fp32 (8- / 4-bit "
        "codes, large weights).");

  m.def("best_isa", [] { return cpu::isa_name(cpu::best_isa()); });
  m.def("active_isa", [] { return cpu::isa_name(cpu::active_isa()); });
  m.def("set_isa", [](const std::string& name) {
    for (cpu::Isa isa : {cpu::Isa::kScalar, cpu::Isa::kAVX2, cpu::Isa::kAVX512})
      if (name == cpu::isa_name(isa)) return cpu::set_isa(isa);
    throw ValueError("unknown ISA '" + name + "' (expected scalar, avx2 or avx512)");
  });
  m.def("avx2_vnni", [] {
    switch (cpu::avx2_vnni()) {
      case cpu::AvxVnni::kVex: return "vex";
      case cpu::AvxVnni::kEvex: return "evex";
      default: return "none";
    }
  }, "The vpdpbusd form the AVX2 kernels use now: 'vex' (AVX-VNNI), 'evex' (AVX512-VNNI standing "
     "in on an AVX-512 CPU) or 'none' (vpmaddubsw; or the active ISA is not AVX2).");
  m.def("set_avx2_vnni", &cpu::set_avx2_vnni, py::arg("on"),
        "Whether the AVX2 kernels use 256-bit vpdpbusd (ValueError where the CPU has neither AVX-VNNI "
        "nor AVX512-VNNI). On by default only where the CPU has AVX-VNNI.");
  m.def("cpu_has_avx_vnni", &cpu::cpu_has_avx_vnni);
  m.def("avx2_vnni_available", &cpu::avx2_vnni_available,
        "Whether set_avx2_vnni(True) works here: AVX-VNNI, or AVX512-VNNI to stand in for it.");
  m.def("kernel_isa", [] {
    const std::string isa = cpu::isa_name(cpu::active_isa());
    switch (cpu::avx2_vnni()) {
      case cpu::AvxVnni::kVex: return isa + "+avx_vnni";
      case cpu::AvxVnni::kEvex: return isa + "+evex_vnni";
      default: return isa;
    }
  }, "The active ISA and, on AVX2, the vpdpbusd form its kernels use: 'avx2+avx_vnni', "
     "'avx2+evex_vnni' (AVX512-VNNI standing in), else as active_isa. Packed layouts follow it.");
}

}  // namespace bindings
}  // namespace tensorslim
