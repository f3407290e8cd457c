"""Feature-level distillation losses: the native forward / backward of the hidden-state and
attention-map losses as torch.library ops and autograd Functions.

Row view (include/tensorslim/distill_features.h, docs/distill.md): student and teacher [R, D]
with unit stride along D, float32 / bfloat16 / float16 (computed in fp32), or both float64
(the scalar C++ reference run in double, so gradcheck tests the very code the other dtypes
use). The forward returns each row's loss (float64 [R]) and a few float64 statistics per row;
the backward writes d(sum_r row_scale[r] * loss_r) / d student straight into a gradient of
the student's dtype. The teacher is a target: it never receives a gradient.
"""
from typing import Tuple

import torch

from .. import _views
from .._native import _C

HIDDEN_KINDS = {"mse": 0, "cosine": 1}
ATTENTION_KINDS = {"kl": 0, "mse": 1}
HIDDEN_STATS = 3     # kHiddenStats
ATTENTION_STATS = 5  # kAttentionStats


def _v(x: torch.Tensor, what: str):
    return _views.view(x, what, float64=True)


def _outputs(rows: int, stats: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(rows, dtype=torch.float64), torch.empty(rows, stats, dtype=torch.float64)


@torch.library.custom_op("tensorslim::hidden_loss_forward", mutates_args=(), device_types="cpu")
def _hidden_forward(student: torch.Tensor, teacher: torch.Tensor, kind: int, eps: float
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    row_loss, stats = _outputs(student.shape[0], HIDDEN_STATS)
    _C.hidden_loss_forward(_v(student, "student_hidden"), _v(teacher, "teacher_hidden"), kind, eps,
                           _v(row_loss, "row_loss"), _v(stats, "stats"))
    return row_loss, stats


@_hidden_forward.register_fake
def _(student, teacher, kind, eps):
    rows = student.shape[0]
    return (student.new_empty(rows, dtype=torch.float64),
            student.new_empty(rows, HIDDEN_STATS, dtype=torch.float64))


@torch.library.custom_op("tensorslim::hidden_loss_backward", mutates_args=(), device_types="cpu")
def _hidden_backward(student: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor, row_scale: torch.Tensor,
                     kind: int, eps: float) -> torch.Tensor:
    grad = torch.empty(student.shape, dtype=student.dtype)
    _C.hidden_loss_backward(_v(student, "student_hidden"), _v(teacher, "teacher_hidden"), kind, eps,
                            _v(stats, "stats"), _v(row_scale, "row_scale"), _v(grad, "grad"))
    return grad


@_hidden_backward.register_fake
def _(student, teacher, stats, row_scale, kind, eps):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


@torch.library.custom_op("tensorslim::attention_loss_forward", mutates_args=(), device_types="cpu")
def _attention_forward(student: torch.Tensor, teacher: torch.Tensor, kind: int, student_logits: bool,
                       teacher_logits: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    row_loss, stats = _outputs(student.shape[0], ATTENTION_STATS)
    _C.attention_loss_forward(_v(student, "student_attn"), _v(teacher, "teacher_attn"), kind, student_logits,
                              teacher_logits, _v(row_loss, "row_loss"), _v(stats, "stats"))
    return row_loss, stats


@_attention_forward.register_fake
def _(student, teacher, kind, student_logits, teacher_logits):
    rows = student.shape[0]
    return (student.new_empty(rows, dtype=torch.float64),
            student.new_empty(rows, ATTENTION_STATS, dtype=torch.float64))


@torch.library.custom_op("tensorslim::attention_loss_backward", mutates_args=(), device_types="cpu")
def _attention_backward(student: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor, row_scale: torch.Tensor,
                        kind: int, student_logits: bool, teacher_logits: bool) -> torch.Tensor:
    grad = torch.empty(student.shape, dtype=student.dtype)
    _C.attention_loss_backward(_v(student, "student_attn"), _v(teacher, "teacher_attn"), kind, student_logits,
                               teacher_logits, _v(stats, "stats"), _v(row_scale, "row_scale"), _v(grad, "grad"))
    return grad


@_attention_backward.register_fake
def _(student, teacher, stats, row_scale, kind, student_logits, teacher_logits):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _row_scale(grad_rows: torch.Tensor) -> torch.Tensor:
    return grad_rows.detach().to(torch.float64).contiguous()


class HiddenRows(torch.autograd.Function):
    """Per-row hidden-state loss [R] (float64) of [R, D] rows; forward and backward native."""

    @staticmethod
    def forward(ctx, student, teacher, kind, eps):
        row_loss, stats = _hidden_forward(student, teacher, kind, eps)
        ctx.save_for_backward(student, teacher, stats)
        ctx.opts = (kind, eps)
        return row_loss

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _hidden_backward(student, teacher, stats, _row_scale(grad_rows), *ctx.opts)
        return grad, None, None, None


class AttentionRows(torch.autograd.Function):
    """Per-row attention-map loss [R] (float64) of [R, keys] rows; forward and backward native."""

    @staticmethod
    def forward(ctx, student, teacher, kind, student_logits, teacher_logits):
        row_loss, stats = _attention_forward(student, teacher, kind, student_logits, teacher_logits)
        ctx.save_for_backward(student, teacher, stats)
        ctx.opts = (kind, student_logits, teacher_logits)
        return row_loss

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _attention_backward(student, teacher, stats, _row_scale(grad_rows), *ctx.opts)
        return grad, None, None, None, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] as [R, D] with unit stride along D (a copy only when needed)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.shape[0] == 0 or x.stride(-1) == 1 else x.contiguous()


def hidden_rows(student: torch.Tensor, teacher: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Native per-row hidden loss of [..., D] tensors as float64 [R]."""
    return HiddenRows.apply(_rows(student), _rows(teacher.detach()), HIDDEN_KINDS[kind], float(eps))


def attention_rows(student: torch.Tensor, teacher: torch.Tensor, kind: str, student_logits: bool,
                   teacher_logits: bool) -> torch.Tensor:
    """Native per-row attention loss of [..., keys] tensors as float64 [R]."""
    return AttentionRows.apply(_rows(student), _rows(teacher.detach()), ATTENTION_KINDS[kind], bool(student_logits),
                               bool(teacher_logits))
