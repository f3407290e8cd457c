// Distillation losses: forward and backward of the KD loss (tensorslim/distill.h) and of the
// hidden-state and attention-map losses (tensorslim/distill_features.h).
#include <pybind11/pybind11.h>

#include "tensorslim/distill.h"
#include "tensorslim/distill_features.h"
#include "views.h"

namespace py = pybind11;

namespace tensorslim {
namespace bindings {

namespace {
KdOptions kd_options(double temperature, double alpha, bool reverse, bool has_labels, int64_t ignore_index) {
  KdOptions o;
  o.temperature = temperature;
  o.alpha = alpha;
  o.reverse = reverse;
  o.has_labels = has_labels;
  o.ignore_index = ignore_index;
  return o;
}
}  // namespace

void register_distill(py::module_& m) {
  m.def("kd_loss_forward", [](py::handle s, py::handle t, py::handle labels, py::handle topk, double temperature,
                              double alpha, bool reverse, int64_t ignore_index, py::handle row_loss,
                              py::handle stats) {
    const TensorView sv = to_view(s, "student_logits"), tv = to_view(t, "teacher_logits"),
                     lv = to_view(row_loss, "row_loss"), stv = to_view(stats, "stats");
    const OptionalView yv = to_optional_view(labels, "labels"), kv = to_optional_view(topk, "top_k indices");
    const KdOptions o = kd_options(temperature, alpha, reverse, yv.present, ignore_index);
    py::gil_scoped_release release;
    kd_loss_forward(sv, tv, yv.get(), kv.get(), o, lv, stv);
  }, "KD loss forward: fills the per-row loss and the statistics the backward needs.");

  m.def("kd_loss_backward", [](py::handle s, py::handle t, py::handle labels, py::handle topk, py::handle stats,
                               py::handle row_scale, double temperature, double alpha, bool reverse,
                               int64_t ignore_index, py::handle grad) {
    const TensorView sv = to_view(s, "student_logits"), tv = to_view(t, "teacher_logits"),
                     stv = to_view(stats, "stats"), wv = to_view(row_scale, "row_scale"),
                     gv = to_view(grad, "grad");
    const OptionalView yv = to_optional_view(labels, "labels"), kv = to_optional_view(topk, "top_k indices");
    const KdOptions o = kd_options(temperature, alpha, reverse, yv.present, ignore_index);
    py::gil_scoped_release release;
    kd_loss_backward(sv, tv, yv.get(), kv.get(), stv, wv, o, gv);
  }, "KD loss backward: grad = d(sum_r row_scale[r] * loss_r) / d student_logits.");
  m.def("hidden_loss_forward", [](py::handle s, py::handle t, int kind, double eps, py::handle row_loss,
                                  py::handle stats) {
    const TensorView sv = to_view(s, "student_hidden"), tv = to_view(t, "teacher_hidden"),
                     lv = to_view(row_loss, "row_loss"), stv = to_view(stats, "stats");
    py::gil_scoped_release release;
    hidden_loss_forward(sv, tv, static_cast<HiddenKind>(kind), eps, lv, stv);
  }, "Hidden-state loss forward: per-row loss and the statistics the backward needs.");

  m.def("hidden_loss_backward", [](py::handle s, py::handle t, int kind, double eps, py::handle stats,
                                   py::handle row_scale, py::handle grad) {
    const TensorView sv = to_view(s, "student_hidden"), tv = to_view(t, "teacher_hidden"),
                     stv = to_view(stats, "stats"), wv = to_view(row_scale, "row_scale"), gv = to_view(grad, "grad");
    py::gil_scoped_release release;
    hidden_loss_backward(sv, tv, static_cast<HiddenKind>(kind), eps, stv, wv, gv);
  }, "Hidden-state loss backward: grad = d(sum_r row_scale[r] * loss_r) / d student.");

  m.def("attention_loss_forward", [](py::handle s, py::handle t, int kind, bool s_logits, bool t_logits,
                                     py::handle row_loss, py::handle stats) {
    const TensorView sv = to_view(s, "student_attn"), tv = to_view(t, "teacher_attn"),
                     lv = to_view(row_loss, "row_loss"), stv = to_view(stats, "stats");
    py::gil_scoped_release release;
    attention_loss_forward(sv, tv, static_cast<AttentionKind>(kind), s_logits, t_logits, lv, stv);
  }, "Attention-map loss forward: per-row loss and the statistics the backward needs.");

  m.def("attention_loss_backward", [](py::handle s, py::handle t, int kind, bool s_logits, bool t_logits,
                                      py::handle stats, py::handle row_scale, py::handle grad) {
    const TensorView sv = to_view(s, "student_attn"), tv = to_view(t, "teacher_attn"),
                     stv = to_view(stats, "stats"), wv = to_view(row_scale, "row_scale"), gv = to_view(grad, "grad");
    py::gil_scoped_release release;
    attention_loss_backward(sv, tv, static_cast<AttentionKind>(kind), s_logits, t_logits, stv, wv, gv);
  }, "Attention-map loss backward: grad = d(sum_r row_scale[r] * loss_r) / d student.");
}

}  // namespace bindings
}  // namespace tensorslim
