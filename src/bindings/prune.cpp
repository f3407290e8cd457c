// Pruning cores (see include/tensorslim/prune.h).
#include "tensorslim/prune.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

void register_prune(py::module_& m) {
  m.def("prune_scores", [](py::handle w, int p, py::handle scores) {
    TensorView wv = to_view(w, "w"), sv = to_view(scores, "scores");
    py::gil_scoped_release release;
    prune_scores(wv, p, sv);
  }, "scores = |w|^p (p = 1 or 2), fp32.");
  m.def("kth_smallest", [](py::handle scores, int64_t k) {
    TensorView sv = to_view(scores, "scores");
    py::gil_scoped_release release;
    return kth_smallest(sv, k);
  }, "The k-th smallest score (1-based), by selection; reorders the buffer.");
  m.def("prune_mask", [](py::handle w, int p, float threshold, int64_t k, py::handle mask) {
    TensorView wv = to_view(w, "w"), mv = to_view(mask, "mask");
    py::gil_scoped_release release;
    return prune_mask(wv, p, threshold, k, mv);
  }, "uint8 keep-mask pruning exactly k entries (scores < threshold, then ties in order).");
  m.def("score_histogram", [](py::handle w, int p, int shift, int nbits, uint32_t prefix, py::handle hist) {
    TensorView wv = to_view(w, "w"), hv = to_view(hist, "hist");
    py::gil_scoped_release release;
    score_histogram(wv, p, shift, nbits, prefix, hv);
  }, "One radix-select pass over the score bits of w, accumulated into hist.");
  m.def("gather_rows", [](py::handle w, py::handle index, py::handle out) {
    TensorView wv = to_view(w, "w"), iv = to_view(index, "index"), ov = to_view(out, "out");
    py::gil_scoped_release release;
    gather_rows(wv, iv, ov);
  }, "out[i] = w[index[i]] (rows of a 2-D fp32 matrix).");
}

}  // namespace bindings
}  // namespace tensorslim
