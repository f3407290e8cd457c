"""Feature-level distillation losses, forward and backward in the native core
(ops/distill_features.py; the plain-PyTorch expressions stay as backend="reference"):

hidden_loss: MSE or cosine distance between hidden states (FitNets, Romero et al. 2015;
  TinyBERT, Jiao et al. 2020), through a learned linear projection when widths differ.
attention_loss: attention-map transfer (TinyBERT's MSE over heads; MiniLM's KL between
  attention distributions, Wang et al. 2020).
The teacher side is a target: it is detached.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import distill_features as _ops

HIDDEN_KINDS = ("mse", "cosine")
ATTENTION_KINDS = ("kl", "mse")
BACKENDS = ("auto", "native", "reference")
COSINE_EPS = 1e-8
PROB_FLOOR = 1e-12  # kAttnProbFloor: probabilities are clamped to it before a log
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class HiddenProjection(nn.Module):
    """A learned map from the student's hidden width to the teacher's (no bias), trained
    with the student; start it near an orthogonal embedding so early losses are sane."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        for what, d in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"HiddenProjection: {what} must be a positive int, got {d!r}")
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


def _check_pair(s, t, fn: str, s_name: str, t_name: str) -> None:
    for x, what in ((s, s_name), (t, t_name)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {what}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{fn}: {what}: expected a float tensor, got {x.dtype}")
        if x.dim() < 1 or x.numel() == 0:
            raise ValueError(f"{fn}: {what}: expected a non-empty tensor, got shape {tuple(x.shape)}")


def _check_backend(backend, fn: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")


def _use_native(s: torch.Tensor, t: torch.Tensor, backend: str, fn: str) -> bool:
    ok = (s.device.type == "cpu" and t.device.type == "cpu" and s.dtype in _NATIVE_DTYPES
          and t.dtype in _NATIVE_DTYPES)
    if backend == "native" and not ok:
        raise ValueError(f"{fn}: backend='native' needs CPU float32 / bfloat16 / float16 / float64 tensors, got "
                         f"{s.dtype} on {s.device} and {t.dtype} on {t.device}")
    return ok and backend != "reference"


def _check_finite(x: torch.Tensor, fn: str, what: str) -> None:
    # The native core checks this in its own pass; only the reference path needs it.
    if not torch.isfinite(x.detach()).all():
        raise ValueError(f"{fn}: {what} contains NaN or Inf")


def _compute_dtype(s: torch.Tensor) -> torch.dtype:
    return torch.float64 if s.dtype == torch.float64 else torch.float32


def _same_precision(s: torch.Tensor, t: torch.Tensor):
    """The teacher in float64 exactly when the student is (the core's float64 path needs both)."""
    if s.dtype == torch.float64:
        return t.double()
    return t.float() if t.dtype == torch.float64 else t


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse",
                projection: Optional[nn.Module] = None, backend: str = "auto") -> torch.Tensor:
    """Mean over all positions of ||P s - t||^2 / width ("mse") or 1 - cos(P s, t) ("cosine",
    cos = s.t / (max(|s|, 1e-8) max(|t|, 1e-8))), P = projection (identity when None;
    required when the widths differ). The result is float32 (float64 for float64 input).
    backend: "native" (C++ core, CPU), "reference" (plain PyTorch), "auto" (native on CPU)."""
    _check_pair(student_hidden, teacher_hidden, "hidden_loss", "student_hidden", "teacher_hidden")
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"hidden_loss: kind must be one of {HIDDEN_KINDS}, got {kind!r}")
    _check_backend(backend, "hidden_loss")
    s = student_hidden if projection is None else projection(student_hidden)
    t = teacher_hidden.detach()
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"hidden_loss: student_hidden has width {s.shape[-1]} but teacher_hidden has "
                         f"{t.shape[-1]}; pass projection=HiddenProjection({s.shape[-1]}, {t.shape[-1]})")
    if s.shape != t.shape:
        raise ValueError(f"hidden_loss: teacher_hidden: expected shape {tuple(s.shape)} like the (projected) "
                         f"student_hidden, got {tuple(t.shape)}")
    dt = _compute_dtype(s)
    if _use_native(s, t, backend, "hidden_loss"):
        rows = _ops.hidden_rows(s, _same_precision(s, t), kind, COSINE_EPS)
        n = rows.numel() * (s.shape[-1] if kind == "mse" else 1)
        return (rows.sum() / n).to(dt)
    _check_finite(s, "hidden_loss", "student_hidden")
    _check_finite(t, "hidden_loss", "teacher_hidden")
    s, t = s.to(dt), t.to(dt)
    if kind == "mse":
        return F.mse_loss(s, t)
    cos = (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(COSINE_EPS) * t.norm(dim=-1).clamp_min(COSINE_EPS))
    return (1 - cos).mean()


def _group_heads(a: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, Lq, Lk] -> [B, heads, Lq, Lk], averaging consecutive groups of H / heads heads."""
    b, h = a.shape[:2]
    return a.reshape(b, heads, h // heads, *a.shape[2:]).mean(2)


def _group_log_heads(log_p: torch.Tensor, heads: int) -> torch.Tensor:
    """log of _group_heads(log_p.exp(), heads), without flooring probabilities: a key masked
    out of every head of a group keeps probability 0 (a 1e-12 floor times the log-ratio to
    a masked student score, ~3e38, came to ~1e26 per key)."""
    b, h = log_p.shape[:2]
    return log_p.reshape(b, heads, h // heads, *log_p.shape[2:]).logsumexp(2) - math.log(h // heads)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, kind: str = "kl",
                   from_logits: bool = False, backend: str = "auto") -> torch.Tensor:
    """Attention maps [batch, heads, queries, keys] (rows are distributions over keys, or
    scores when from_logits). "kl": mean over batch, heads and queries of
    KL(teacher row || student row), probabilities clamped to 1e-12 before the logs; "mse":
    mean squared difference of the maps. Scores must be finite (mask with a large negative
    number, not -inf). When the teacher has more heads (a multiple of the student's), its
    heads are averaged in consecutive groups so each student head matches one group.
    The result is float32 (float64 for float64 input). backend: as hidden_loss."""
    _check_pair(student_attn, teacher_attn, "attention_loss", "student_attn", "teacher_attn")
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention_loss: kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    _check_backend(backend, "attention_loss")
    if not isinstance(from_logits, bool):
        raise TypeError(f"attention_loss: from_logits must be a bool, got {type(from_logits).__name__}")
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError("attention_loss: expected [batch, heads, queries, keys] maps, got student_attn "
                         f"{tuple(student_attn.shape)} and teacher_attn {tuple(teacher_attn.shape)}")
    hs, ht = student_attn.shape[1], teacher_attn.shape[1]
    if ht % hs:
        raise ValueError(f"attention_loss: teacher_attn has {ht} heads, not a multiple of the student's {hs}")
    if student_attn.shape[0] != teacher_attn.shape[0] or student_attn.shape[2:] != teacher_attn.shape[2:]:
        b, _, q, k = student_attn.shape
        raise ValueError(f"attention_loss: teacher_attn: expected [batch, heads, queries, keys] = "
                         f"[{b}, *, {q}, {k}] like student_attn, got {tuple(teacher_attn.shape)}")
    if _use_native(student_attn, teacher_attn, backend, "attention_loss"):
        return _attention_native(student_attn, teacher_attn, kind, from_logits)
    _check_finite(student_attn, "attention_loss", "student_attn")
    _check_finite(teacher_attn, "attention_loss", "teacher_attn")
    dt = _compute_dtype(student_attn)
    s, t = student_attn.to(dt), teacher_attn.detach().to(dt)
    if kind == "kl":
        log_s = F.log_softmax(s, -1) if from_logits else s.clamp_min(PROB_FLOOR).log()
        log_t = F.log_softmax(t, -1) if from_logits else t.clamp_min(PROB_FLOOR).log()
        if ht != hs:  # average the teacher's distributions, then compare
            log_t = (_group_log_heads(log_t, hs) if from_logits
                     else _group_heads(log_t.exp(), hs).clamp_min(PROB_FLOOR).log())
        p_t = log_t.exp()
        return (p_t * (log_t - log_s)).sum(-1).mean()
    if from_logits:
        s, t = s.softmax(-1), t.softmax(-1)
    if ht != hs:
        t = _group_heads(t, hs)
    return F.mse_loss(s, t)


def _attention_native(s: torch.Tensor, t: torch.Tensor, kind: str, from_logits: bool) -> torch.Tensor:
    dt = _compute_dtype(s)
    t = _same_precision(s, t.detach())
    teacher_logits = from_logits
    hs, ht = s.shape[1], t.shape[1]
    if ht != hs:  # the grouped teacher is a target: averaged here as probabilities, no graph
        with torch.no_grad():
            p = t.to(dt)
            if from_logits and kind == "kl":  # log-probabilities are logits of the same rows
                t = _group_log_heads(p.log_softmax(-1), hs)
            else:
                p = p.softmax(-1) if from_logits else (p.clamp_min(PROB_FLOOR) if kind == "kl" else p)
                t, teacher_logits = _group_heads(p, hs), False
    rows = _ops.attention_rows(s, t, kind, from_logits, teacher_logits)
    n = rows.numel() * (s.shape[-1] if kind == "mse" else 1)
    return (rows.sum() / n).to(dt)
