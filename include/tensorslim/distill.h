// Knowledge-distillation losses on the CPU (Hinton et al. 2015, "Distilling the Knowledge
// in a Neural Network"). docs/distill.md has the formulas; in short, per row r of
// student logits s and teacher logits t (both [R, V], unit stride along V; f32, bf16 or f16
// computed in fp32, or both f64: the scalar reference run in double, which gradcheck uses):
//
//   p_s = softmax(s / T), p_t = softmax(t / T)
//   KD  = T^2 * KL(p_t || p_s)            (reverse: T^2 * KL(p_s || p_t))
//   CE  = logsumexp(s) - s[label]          (only when labels are given, at T = 1)
//   loss_r = alpha * KD + (1 - alpha) * CE      (no labels: loss_r = KD)
//
// top_k (forward KL only): p_t is the teacher's softmax over its k given tokens only
// (renormalized over them), p_s stays the student's full softmax, so KD = T^2 * sum over
// those k tokens of p_t (log p_t - log p_s).
// Rows whose label equals ignore_index give loss 0 and gradient 0.
// The vocabulary is streamed in chunks with an online log-sum-exp, so the forward keeps only
// a few numbers per row and the backward writes the gradient straight into its buffer.
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

struct KdOptions {
  double temperature = 1.0;
  double alpha = 0.5;       // weight of KD when labels are given
  bool reverse = false;     // KL(p_s || p_t) instead of KL(p_t || p_s)
  bool has_labels = false;
  int64_t ignore_index = -100;
};

// Per-row statistics the forward saves for the backward ([R, kKdStats]; fp32, f64 for f64 logits).
enum KdStat : int { kStudentMax = 0, kStudentLogZ, kTeacherMax, kTeacherLogZ, kStudentLogZ1, kKl, kKdStats = 8 };

// row_loss: [R] (loss_r, 0 on ignored rows); stats: [R, kKdStats]; row_loss, stats and the
// backward's row_scale are fp32, or f64 for f64 logits.
// labels: int32 [R] or null; topk: int32 [R, k] teacher token indices or null.
void kd_loss_forward(const TensorView& student, const TensorView& teacher, const TensorView* labels,
                     const TensorView* topk, const KdOptions& opt, const TensorView& row_loss,
                     const TensorView& stats);

// grad = d(sum_r row_scale[r] * loss_r) / d student, written in student's dtype and shape.
void kd_loss_backward(const TensorView& student, const TensorView& teacher, const TensorView* labels,
                      const TensorView* topk, const TensorView& stats, const TensorView& row_scale,
                      const KdOptions& opt, const TensorView& grad);

}  // namespace tensorslim
