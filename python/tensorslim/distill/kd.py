"""ts.distill.kd_loss: Hinton et al. (2015) soft-target distillation, mixed with the
hard-label cross-entropy, computed in the native core (docs/distill.md)."""
from typing import Optional

import torch

from ..ops import distill as _ops

REDUCTIONS = ("batchmean", "mean", "sum", "none")
BACKENDS = ("auto", "native", "reference")
_INT32 = 2 ** 31
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_logits(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kd_loss: {what}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"kd_loss: {what}: expected float logits, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"kd_loss: {what}: expected [..., vocab] logits with vocab >= 1, got shape {tuple(x.shape)}")


def _check_args(s, t, temperature, labels, alpha, reduction, reverse, top_k, backend):
    _check_logits(s, "student_logits")
    _check_logits(t, "teacher_logits")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"kd_loss: vocabulary mismatch: student_logits has {s.shape[-1]} classes, "
                         f"teacher_logits has {t.shape[-1]}")
    if s.shape != t.shape:
        raise ValueError(f"kd_loss: teacher_logits: expected shape {tuple(s.shape)} like student_logits, "
                         f"got {tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"kd_loss: teacher_logits is on {t.device}, student_logits on {s.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"kd_loss: temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"kd_loss: alpha must be in [0, 1], got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"kd_loss: backend must be one of {BACKENDS}, got {backend!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= s.shape[-1]:
            raise ValueError(f"kd_loss: top_k must be an int in [1, vocab={s.shape[-1]}], got {top_k!r}")
        if reverse:
            raise ValueError("kd_loss: top_k needs the forward KL (reverse=False): the reverse KL weighs "
                             "every token by the student and is unbounded off the teacher's top k")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"kd_loss: labels: expected a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"kd_loss: labels: expected integer class indices, got {labels.dtype}")
        if labels.shape != s.shape[:-1]:
            raise ValueError(f"kd_loss: labels: expected shape {tuple(s.shape[:-1])} (student_logits without "
                             f"its vocabulary dimension), got {tuple(labels.shape)}")
        if labels.device != s.device:
            raise ValueError(f"kd_loss: labels is on {labels.device}, student_logits on {s.device}")


def _check_finite(x: torch.Tensor, what: str) -> None:
    # The native core checks this during its own pass; only the reference path needs it.
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"kd_loss: {what} contains NaN or Inf; logits must be finite")


def _reduce(rows: torch.Tensor, reduction: str, lead: torch.Size, batch: int, n_valid) -> torch.Tensor:
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(batch, 1)
    return total / n_valid.clamp_min(1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            labels: Optional[torch.Tensor] = None, alpha: float = 0.5, reduction: str = "batchmean",
            reverse: bool = False, ignore_index: int = -100, top_k: Optional[int] = None,
            backend: str = "auto") -> torch.Tensor:
    """Knowledge-distillation loss of student logits against teacher logits, [..., vocab].

    Per row (token): KD = T^2 * KL(p_t || p_s) with p = softmax(logits / T) (reverse=True:
    T^2 * KL(p_s || p_t)); with labels, loss = alpha * KD + (1 - alpha) * CE(student, label),
    and rows whose label is ignore_index count as 0 (and are left out of "mean").
    top_k: the teacher's distribution over its k largest logits only, renormalized over them;
    the student's softmax stays over the whole vocabulary (forward KL only).
    reduction: "batchmean" = sum / student_logits.shape[0] (torch.kl_div's definition),
    "mean" = sum / rows not ignored, "sum", or "none" (shape student_logits.shape[:-1]).
    The teacher is a target and gets no gradient. backend: "native" (C++ core, CPU; float64
    logits run its scalar reference in double), "reference" (plain PyTorch), "auto" (native
    on CPU for float32 / bfloat16 / float16 / float64).
    """
    _check_args(student_logits, teacher_logits, temperature, labels, alpha, reduction, reverse, top_k, backend)
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    y = None if labels is None else labels.reshape(-1)
    if y is not None and y.numel() and (int(y.min()) < -_INT32 or int(y.max()) >= _INT32):
        raise ValueError(f"kd_loss: labels: values must be class indices in [0, {vocab}), got "
                         f"{int(y.min())} .. {int(y.max())}")
    n_valid = None
    if reduction == "mean":
        n_valid = (torch.tensor(s.shape[0]) if y is None else (y != ignore_index).sum()).to(torch.float32)

    if s.dtype == torch.float64:  # the core's float64 path (its scalar reference) needs both in float64
        t = t.double()
    elif t.dtype == torch.float64:
        t = t.float()
    native_ok = (s.device.type == "cpu" and s.dtype in _NATIVE_DTYPES and t.dtype in _NATIVE_DTYPES
                 and -_INT32 <= ignore_index < _INT32)
    if backend == "native" and not native_ok:
        raise ValueError("kd_loss: backend='native' needs CPU float32 / bfloat16 / float16 / float64 logits and an "
                         f"int32 ignore_index, got {s.dtype} on {s.device}")
    if backend == "reference" or not native_ok:
        _check_finite(s, "student_logits")
        _check_finite(t, "teacher_logits")
        if y is not None:
            bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
            if bad.any():
                raise ValueError(f"kd_loss: labels: value {int(y[bad][0])} is out of range [0, {vocab}) and "
                                 f"is not ignore_index ({ignore_index})")
        rows = _ops.kd_rows_reference(s, t, y, top_k, temperature, alpha, reverse, ignore_index)
        if n_valid is not None:
            n_valid = n_valid.to(rows.dtype)
        return _reduce(rows, reduction, lead, batch, n_valid)

    if s.shape[0] and s.stride(-1) != 1:
        s = s.contiguous()
    if t.shape[0] and t.stride(-1) != 1:
        t = t.contiguous()
    topk = None
    if top_k is not None:
        topk = torch.topk(t, top_k, dim=-1, sorted=False).indices.to(torch.int32).contiguous()
    y32 = None if y is None else y.to(torch.int32).contiguous()
    rows = _ops.kd_rows(s, t, y32, topk, temperature, alpha, reverse, ignore_index)
    if n_valid is not None:
        n_valid = n_valid.to(rows.dtype)
    return _reduce(rows, reduction, lead, batch, n_valid)
