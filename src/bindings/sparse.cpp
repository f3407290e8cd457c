// Sparse storage and linears (see include/tensorslim/sparse.h).
#include "tensorslim/sparse.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

namespace {

// (kh, kw, sh, sw, ph, pw, dh, dw[, groups])
ConvGeometry conv_geometry(py::sequence s) {
  const size_t n = py::len(s);
  if (n != 8 && n != 9) throw py::value_error("geometry must be (kh, kw, sh, sw, ph, pw, dh, dw[, groups])");
  ConvGeometry g;
  int64_t* f[9] = {&g.kh, &g.kw, &g.sh, &g.sw, &g.ph, &g.pw, &g.dh, &g.dw, &g.groups};
  for (size_t i = 0; i < n; ++i) *f[i] = s[i].cast<int64_t>();
  return g;
}

}  // namespace

void register_sparse(py::module_& m) {
  m.def("nm_pack", [](py::handle w, py::handle keep, int n, int mm, py::handle values, py::handle indices,
                      py::handle scales) {
    TensorView wv = to_view(w, "w"), kv = to_view(keep, "keep"), vv = to_view(values, "values"),
               iv = to_view(indices, "indices");
    OptionalView sv = to_optional_view(scales, "scales");
    py::gil_scoped_release release;
    nm_pack(wv, kv, n, mm, vv, iv, sv.get());
  }, "Packs w * keep into N:M values / indices (and int8 scales).");
  m.def("nm_unpack", [](py::handle values, py::handle indices, py::handle scales, int n, int mm, py::handle out) {
    TensorView vv = to_view(values, "values"), iv = to_view(indices, "indices"), ov = to_view(out, "out");
    OptionalView sv = to_optional_view(scales, "scales");
    py::gil_scoped_release release;
    nm_unpack(vv, iv, sv.get(), n, mm, ov);
  }, "The dense float32 [N, K] weight of an N:M packed one.");
  m.def("nm_linear", [](py::handle x, py::handle values, py::handle indices, py::handle scales, py::handle bias,
                        int n, int mm, py::handle out, py::handle workspace) {
    TensorView xv = to_view(x, "x"), vv = to_view(values, "values"), iv = to_view(indices, "indices"),
               ov = to_view(out, "out");
    OptionalView sv = to_optional_view(scales, "scales"), bv = to_optional_view(bias, "bias"),
                 wv = to_optional_view(workspace, "workspace");
    py::gil_scoped_release release;
    nm_linear(xv, vv, iv, sv.get(), bv.get(), n, mm, ov, wv.get());
  }, "out = x @ W^T (+ bias) for an N:M packed W.");
  m.def("sparse_gathers", &cpu::sparse_gathers,
        "Whether the sparse kernels read scattered values (x at CSR columns at batches 1-2, convolution "
        "input offsets) with gathers (default on Intel) rather than scalar loads.");
  m.def("set_sparse_gathers", &cpu::set_sparse_gathers, py::arg("on"),
        "Scattered reads in the sparse kernels: gathers (True) or scalar loads (False); the same sums "
        "either way.");
  m.def("csr_pack", [](py::handle w, py::handle keep, py::handle row_ptr, py::handle values, py::handle cols,
                       py::handle scales) {
    TensorView wv = to_view(w, "w"), kv = to_view(keep, "keep"), rv = to_view(row_ptr, "row_ptr"),
               vv = to_view(values, "values"), cv = to_view(cols, "cols");
    OptionalView sv = to_optional_view(scales, "scales");
    py::gil_scoped_release release;
    csr_pack(wv, kv, rv, vv, cv, sv.get());
  }, "Fills CSR values / cols (and int8 scales) of w * keep for the given row_ptr.");
  m.def("csr_unpack", [](py::handle values, py::handle cols, py::handle row_ptr, py::handle scales,
                         py::handle out) {
    TensorView vv = to_view(values, "values"), cv = to_view(cols, "cols"), rv = to_view(row_ptr, "row_ptr"),
               ov = to_view(out, "out");
    OptionalView sv = to_optional_view(scales, "scales");
    py::gil_scoped_release release;
    csr_unpack(vv, cv, rv, sv.get(), ov);
  }, "The dense float32 [N, K] weight of a CSR one.");
  m.def("csr_linear", [](py::handle x, py::handle values, py::handle cols, py::handle row_ptr, py::handle scales,
                         py::handle bias, py::handle out, py::handle workspace) {
    TensorView xv = to_view(x, "x"), vv = to_view(values, "values"), cv = to_view(cols, "cols"),
               rv = to_view(row_ptr, "row_ptr"), ov = to_view(out, "out");
    OptionalView sv = to_optional_view(scales, "scales"), bv = to_optional_view(bias, "bias"),
                 wv = to_optional_view(workspace, "workspace");
    py::gil_scoped_release release;
    csr_linear(xv, vv, cv, rv, sv.get(), bv.get(), ov, wv.get());
  }, "out = x @ W^T (+ bias) for a CSR W.");
  m.def("nm_conv2d", [](py::handle x, py::handle values, py::handle indices, py::handle scales, py::handle bias,
                        int n, int mm, py::sequence geometry, py::handle out, py::handle workspace) {
    TensorView xv = to_view(x, "x"), vv = to_view(values, "values"), iv = to_view(indices, "indices"),
               ov = to_view(out, "out"), wv = to_view(workspace, "workspace");
    OptionalView sv = to_optional_view(scales, "scales"), bv = to_optional_view(bias, "bias");
    const ConvGeometry g = conv_geometry(geometry);
    py::gil_scoped_release release;
    nm_conv2d(xv, vv, iv, sv.get(), bv.get(), n, mm, g, ov, wv);
  }, "out = conv2d(x, W) (+ bias) for an N:M packed W [N, C*kh*kw]; geometry (kh, kw, sh, sw, ph, pw, dh, dw[, groups]).");
  m.def("csr_conv2d", [](py::handle x, py::handle values, py::handle cols, py::handle row_ptr, py::handle scales,
                         py::handle bias, py::sequence geometry, py::handle out, py::handle workspace) {
    TensorView xv = to_view(x, "x"), vv = to_view(values, "values"), cv = to_view(cols, "cols"),
               rv = to_view(row_ptr, "row_ptr"), ov = to_view(out, "out"), wv = to_view(workspace, "workspace");
    OptionalView sv = to_optional_view(scales, "scales"), bv = to_optional_view(bias, "bias");
    const ConvGeometry g = conv_geometry(geometry);
    py::gil_scoped_release release;
    csr_conv2d(xv, vv, cv, rv, sv.get(), bv.get(), g, ov, wv);
  }, "out = conv2d(x, W) (+ bias) for a CSR W [N, C*kh*kw]; geometry (kh, kw, sh, sw, ph, pw, dh, dw[, groups]).");
  m.def("sparse_conv2d_workspace", [](int64_t B, int64_t C, int64_t H, int64_t W, py::sequence geometry) {
    return sparse_conv2d_workspace(B, C, H, W, conv_geometry(geometry));
  }, "float32 elements of workspace the sparse convolutions need for x [B, C, H, W].");
  m.def("sparse_linear_workspace", &sparse_linear_workspace,
        "float32 elements of workspace the sparse linears need for a batch of M rows of width K.");
}

}  // namespace bindings
}  // namespace tensorslim
