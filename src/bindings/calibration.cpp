// Calibration cores: GPTQ's column loop and AWQ's scale / clip searches.
#include <pybind11/pybind11.h>

#include "tensorslim/awq.h"
#include "tensorslim/gptq.h"
#include "tensorslim/sparsegpt.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

void register_calibration(py::module_& m) {
  m.def("gptq_quantize", [](py::handle w, py::handle h, int bits, bool symmetric, int64_t group,
                            int64_t block, bool act_order, double damp, py::handle codes,
                            py::handle scales, py::handle zps) {
    TensorView wv = to_view(w, "w"), hv = to_view(h, "h"), cv = to_view(codes, "codes"),
               sv = to_view(scales, "scales"), zv = to_view(zps, "zero_points");
    GptqOptions opt;
    opt.bits = bits;
    opt.symmetric = symmetric;
    opt.group_size = group;
    opt.block_size = block;
    opt.act_order = act_order;
    opt.damp = damp;
    GptqResult r;
    {
      py::gil_scoped_release release;
      r = gptq_quantize(wv, hv, opt, cv, sv, zv);
    }
    return py::make_tuple(r.damp_used, r.loss);
  }, "GPTQ: codes, scales, zero points of w given H; returns (damp used, loss).");

  m.def("sparsegpt_prune", [](py::handle w, py::handle h, int n, int m_, double sparsity, int bits,
                              int64_t block, double damp, py::handle out, py::handle keep, py::handle scales,
                              bool given_scales) {
    TensorView wv = to_view(w, "w"), hv = to_view(h, "h"), ov = to_view(out, "out"),
               kv = to_view(keep, "keep"), sv = to_view(scales, "scales");
    SparseGptOptions opt;
    opt.n = n;
    opt.m = m_;
    opt.sparsity = sparsity;
    opt.bits = bits;
    opt.block_size = block;
    opt.damp = damp;
    opt.given_scales = given_scales;
    SparseGptResult r;
    {
      py::gil_scoped_release release;
      r = sparsegpt_prune(wv, hv, opt, ov, kv, sv);
    }
    return py::make_tuple(r.damp_used, r.loss);
  }, "SparseGPT: pruned (optionally quantized) weights and keep-mask of w given H; returns (damp used, loss).");

  m.def("awq_search_scale", [](py::handle w, py::handle g, py::handle act, int bits, bool symmetric,
                               int64_t group, int64_t n_grid, py::handle losses) {
    TensorView wv = to_view(w, "w"), gv = to_view(g, "g"), av = to_view(act, "act"),
               lv = to_view(losses, "losses");
    AwqQuant q{bits, symmetric, group};
    py::gil_scoped_release release;
    return awq_search_scale(wv, gv, av, q, n_grid, lv);
  }, "AWQ scale search: fills losses per grid point, returns the best index.");

  m.def("awq_search_clip", [](py::handle w, py::handle g, int bits, bool symmetric, int64_t group,
                              int64_t n_grid, double max_shrink, py::handle best, py::handle losses) {
    TensorView wv = to_view(w, "w"), gv = to_view(g, "g"), bv = to_view(best, "best_ratio"),
               lv = to_view(losses, "losses");
    AwqQuant q{bits, symmetric, group};
    py::gil_scoped_release release;
    awq_search_clip(wv, gv, q, n_grid, max_shrink, bv, lv);
  }, "AWQ clip search: best clip ratio per (row, group) and the loss of every ratio.");
}

}  // namespace bindings
}  // namespace tensorslim
