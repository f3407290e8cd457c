// Low-rank factorization cores: SVD (exact / randomized), SVD-LLM whitening, Tucker-2, CP-ALS.
#include <pybind11/pybind11.h>

#include "tensorslim/lowrank.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

void register_lowrank(py::module_& m) {
  m.def("svd_exact", [](py::handle w, bool double_precision, py::handle u, py::handle s,
                        py::handle vt) {
    TensorView wv = to_view(w, "w"), uv = to_view(u, "u"), sv = to_view(s, "s"), vv = to_view(vt, "vt");
    py::gil_scoped_release release;
    svd_exact(wv, double_precision, uv, sv, vv);
  }, "Thin SVD (Eigen BDCSVD) of w into u, s, vt.");

  m.def("svd_randomized", [](py::handle w, int64_t oversample, int power_iters, uint64_t seed,
                             py::handle u, py::handle s, py::handle vt) {
    TensorView wv = to_view(w, "w"), uv = to_view(u, "u"), sv = to_view(s, "s"), vv = to_view(vt, "vt");
    py::gil_scoped_release release;
    svd_randomized(wv, oversample, power_iters, seed, uv, sv, vv);
  }, "Randomized rank-k SVD of w (k = len(s)) into u, s, vt.");

  m.def("whiten", [](py::handle w, py::handle g, double damp, py::handle wl, py::handle l) {
    TensorView wv = to_view(w, "w"), gv = to_view(g, "g"), wlv = to_view(wl, "wl"), lv = to_view(l, "l");
    py::gil_scoped_release release;
    return whiten(wv, gv, damp, wlv, lv);
  }, "SVD-LLM whitening: l = chol(g + damp), wl = w l; returns the damping used.");

  m.def("unwhiten", [](py::handle vt, py::handle l, py::handle out) {
    TensorView vv = to_view(vt, "vt"), lv = to_view(l, "l"), ov = to_view(out, "out");
    py::gil_scoped_release release;
    unwhiten(vv, lv, ov);
  }, "out = vt l^-1 (triangular solve).");

  m.def("tucker2_spectra", [](py::handle w, py::handle s_out, py::handle s_in) {
    TensorView wv = to_view(w, "w"), ov = to_view(s_out, "s_out"), iv = to_view(s_in, "s_in");
    py::gil_scoped_release release;
    tucker2_spectra(wv, ov, iv);
  }, "Singular values of a conv kernel's output- and input-channel unfoldings.");

  m.def("tucker2", [](py::handle w, int als_sweeps, py::handle u_out, py::handle u_in, py::handle core) {
    TensorView wv = to_view(w, "w"), ov = to_view(u_out, "u_out"), iv = to_view(u_in, "u_in"),
               cv = to_view(core, "core");
    py::gil_scoped_release release;
    return tucker2(wv, als_sweeps, ov, iv, cv);
  }, "Tucker-2 (HOSVD + HOOI sweeps) of a conv kernel; returns the relative error.");

  m.def("cp_als", [](py::handle w, int iters, uint64_t seed, py::handle a, py::handle b,
                     py::handle c, py::handle d) {
    TensorView wv = to_view(w, "w"), av = to_view(a, "a"), bv = to_view(b, "b"), cv = to_view(c, "c"),
               dv = to_view(d, "d");
    py::gil_scoped_release release;
    return cp_als(wv, iters, seed, av, bv, cv, dv);
  }, "CP-ALS of a conv kernel into a, b, c, d; returns the relative error.");
}

}  // namespace bindings
}  // namespace tensorslim
