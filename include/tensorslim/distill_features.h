// Feature-level distillation losses on the CPU, per row (docs/distill.md has the formulas).
// Rows are the last dimension of the caller's tensors, flattened: [R, D] views with unit
// stride along D, f32 / bf16 / f16 (computed in fp32), or both f64 (the scalar reference in
// double: the path torch.autograd.gradcheck runs). The teacher is a target: no gradient.
//
// hidden:    mse     loss_r = sum_i (s_i - t_i)^2
//            cosine  loss_r = 1 - s.t / (max(|s|, eps) max(|t|, eps))
// attention: rows are distributions over keys, given as probabilities or as scores (logits,
//            softmaxed here with a log-sum-exp); probabilities are clamped to 1e-12 before logs.
//            kl      loss_r = sum_i p_t,i (log p_t,i - log p_s,i)       (KL(teacher || student))
//            mse     loss_r = sum_i (p_s,i - p_t,i)^2
// The backward writes grad = row_scale[r] * d loss_r / d student into a buffer of the
// student's dtype and shape, from the statistics the forward saved.
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

enum class HiddenKind : int { kMse = 0, kCosine = 1 };
enum class AttentionKind : int { kKl = 0, kMse = 1 };

// Per-row statistics (f64 [R, k]): hidden: s.s, t.t, s.t; attention: the two sides' maxima and
// log partition functions, and the backward's row constant c (feature_kernels.h).
constexpr int kHiddenStats = 3;
constexpr int kAttentionStats = 5;

// row_loss: f64 [R]; stats: f64 [R, kHiddenStats].
void hidden_loss_forward(const TensorView& student, const TensorView& teacher, HiddenKind kind, double eps,
                         const TensorView& row_loss, const TensorView& stats);
// row_scale: f64 [R].
void hidden_loss_backward(const TensorView& student, const TensorView& teacher, HiddenKind kind, double eps,
                          const TensorView& stats, const TensorView& row_scale, const TensorView& grad);

// row_loss: f64 [R]; stats: f64 [R, kAttentionStats].
void attention_loss_forward(const TensorView& student, const TensorView& teacher, AttentionKind kind,
                            bool student_logits, bool teacher_logits, const TensorView& row_loss,
                            const TensorView& stats);
void attention_loss_backward(const TensorView& student, const TensorView& teacher, AttentionKind kind,
                             bool student_logits, bool teacher_logits, const TensorView& stats,
                             const TensorView& row_scale, const TensorView& grad);

}  // namespace tensorslim
