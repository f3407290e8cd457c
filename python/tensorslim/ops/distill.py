"""Distillation losses: the KD loss's native forward / backward as torch.library ops.

Row view (see include/tensorslim/distill.h and docs/distill.md): student and teacher
logits [R, V], labels int32 [R] or None, the teacher's top-k token indices int32 [R, k] or
None. The forward returns each row's loss and 8 statistics per row (maxima, log
partition functions, KL; fp32, or float64 for float64 logits, which run the scalar C++
reference in double) from which the backward rebuilds the softmaxes in one pass,
writing d(sum_r row_scale[r] * loss_r) / d student straight into the gradient buffer.
The teacher is a target: it never receives a gradient.

kd_loss_reference is the same specification in plain PyTorch (log_softmax / cross_entropy);
it runs in float64 for float64 inputs. gradcheck runs on both: the native Function with
float64 logits, and the reference.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _views
from .._native import _C

KD_STATS = 8  # kKdStats in distill.h


def _acc_dtype(student: torch.Tensor) -> torch.dtype:
    """The per-row outputs' dtype: float64 for float64 logits, else fp32."""
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _v(x, what: str):
    return _views.optional_view(x, what) if x is None else _views.view(x, what, float64=True)


@torch.library.custom_op("tensorslim::kd_loss_forward", mutates_args=(), device_types="cpu")
def _kd_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                topk: Optional[torch.Tensor], temperature: float, alpha: float, reverse: bool,
                ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = student.shape[0]
    row_loss = torch.empty(rows, dtype=_acc_dtype(student))
    stats = torch.empty(rows, KD_STATS, dtype=_acc_dtype(student))
    _C.kd_loss_forward(_v(student, "student_logits"), _v(teacher, "teacher_logits"),
                       _views.optional_view(labels, "labels"), _views.optional_view(topk, "top_k indices"),
                       temperature, alpha, reverse, ignore_index, _v(row_loss, "row_loss"), _v(stats, "stats"))
    return row_loss, stats


@_kd_forward.register_fake
def _(student, teacher, labels, topk, temperature, alpha, reverse, ignore_index):
    rows = student.shape[0]
    return (student.new_empty(rows, dtype=_acc_dtype(student)),
            student.new_empty(rows, KD_STATS, dtype=_acc_dtype(student)))


@torch.library.custom_op("tensorslim::kd_loss_backward", mutates_args=(), device_types="cpu")
def _kd_backward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                 topk: Optional[torch.Tensor], stats: torch.Tensor, row_scale: torch.Tensor,
                 temperature: float, alpha: float, reverse: bool, ignore_index: int) -> torch.Tensor:
    grad = torch.empty(student.shape, dtype=student.dtype)
    _C.kd_loss_backward(_v(student, "student_logits"), _v(teacher, "teacher_logits"),
                        _views.optional_view(labels, "labels"), _views.optional_view(topk, "top_k indices"),
                        _v(stats, "stats"), _v(row_scale, "row_scale"), temperature,
                        alpha, reverse, ignore_index, _v(grad, "grad"))
    return grad


@_kd_backward.register_fake
def _(student, teacher, labels, topk, stats, row_scale, temperature, alpha, reverse, ignore_index):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


class KDRows(torch.autograd.Function):
    """Per-row KD loss [R] (fp32; float64 for float64 logits) of 2-D logits with unit stride
    along the vocabulary; forward and backward both run in the native core."""

    @staticmethod
    def forward(ctx, student, teacher, labels, topk, temperature, alpha, reverse, ignore_index):
        row_loss, stats = _kd_forward(student, teacher, labels, topk, temperature, alpha, reverse, ignore_index)
        ctx.save_for_backward(student, teacher, labels, topk, stats)
        ctx.opts = (temperature, alpha, reverse, ignore_index)
        ctx.mark_non_differentiable(stats)
        return row_loss, stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        student, teacher, labels, topk, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            row_scale = grad_rows.detach().to(stats.dtype).contiguous()
            grad = _kd_backward(student, teacher, labels, topk, stats, row_scale, *ctx.opts)
        return grad, None, None, None, None, None, None, None


def kd_rows(student, teacher, labels, topk, temperature, alpha, reverse, ignore_index) -> torch.Tensor:
    """Native per-row KD loss; see KDRows."""
    return KDRows.apply(student, teacher.detach(), labels, topk, float(temperature), float(alpha),
                        bool(reverse), int(ignore_index))[0]


def kd_rows_reference(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                      top_k: Optional[int], temperature: float, alpha: float, reverse: bool,
                      ignore_index: int) -> torch.Tensor:
    """The per-row KD loss in plain PyTorch (float64 for float64 input, else float32)."""
    dt = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.to(dt)
    t = teacher.detach().to(dt)
    T = float(temperature)
    log_ps = F.log_softmax(s / T, dim=-1)
    if top_k is not None:
        idx = torch.topk(t, top_k, dim=-1).indices
        log_pt = F.log_softmax(t.gather(-1, idx) / T, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps.gather(-1, idx))).sum(-1)
    elif reverse:
        log_pt = F.log_softmax(t / T, dim=-1)
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        log_pt = F.log_softmax(t / T, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    rows = T * T * kl
    if labels is not None:
        y = labels.long()
        keep = y != ignore_index
        ce = F.cross_entropy(s, torch.where(keep, y, 0), reduction="none")
        rows = torch.where(keep, alpha * rows + (1 - alpha) * ce, torch.zeros((), dtype=dt))
    return rows
