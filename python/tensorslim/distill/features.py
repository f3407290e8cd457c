"""Feature-level distillation losses (cheap, so plain PyTorch):

hidden_loss: MSE or cosine distance between hidden states (FitNets, Romero et al. 2015;
  TinyBERT, Jiao et al. 2020), through a learned linear projection when widths differ.
attention_loss: attention-map transfer (TinyBERT's MSE over heads; MiniLM's KL between
  attention distributions, Wang et al. 2020).
The teacher side is a target: it is detached.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_KINDS = ("mse", "cosine")
ATTENTION_KINDS = ("kl", "mse")


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


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse",
                projection: Optional[nn.Module] = None) -> torch.Tensor:
    """Mean over all positions of ||P s - t||^2 / width ("mse") or 1 - cos(P s, t) ("cosine"),
    P = projection (identity when None; required when the widths differ)."""
    _check_pair(student_hidden, teacher_hidden, "hidden_loss", "student_hidden", "teacher_hidden")
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"hidden_loss: kind must be one of {HIDDEN_KINDS}, got {kind!r}")
    s = student_hidden if projection is None else projection(student_hidden)
    t = teacher_hidden.detach()
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"hidden_loss: student_hidden has width {s.shape[-1]} but teacher_hidden has "
                         f"{t.shape[-1]}; pass projection=HiddenProjection({s.shape[-1]}, {t.shape[-1]})")
    if s.shape != t.shape:
        raise ValueError(f"hidden_loss: teacher_hidden: expected shape {tuple(s.shape)} like the (projected) "
                         f"student_hidden, got {tuple(t.shape)}")
    s, t = s.float(), t.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()


def _group_heads(a: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, Lq, Lk] -> [B, heads, Lq, Lk], averaging consecutive groups of H / heads heads."""
    b, h = a.shape[:2]
    return a.reshape(b, heads, h // heads, *a.shape[2:]).mean(2)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, kind: str = "kl",
                   from_logits: bool = False) -> torch.Tensor:
    """Attention maps [batch, heads, queries, keys] (rows are distributions over keys, or
    scores when from_logits). "kl": mean over batch, heads and queries of
    KL(teacher row || student row); "mse": mean squared difference of the maps.
    When the teacher has more heads (a multiple of the student's), its heads are averaged
    in consecutive groups so each student head matches one group."""
    _check_pair(student_attn, teacher_attn, "attention_loss", "student_attn", "teacher_attn")
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention_loss: kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError("attention_loss: expected [batch, heads, queries, keys] maps, got student_attn "
                         f"{tuple(student_attn.shape)} and teacher_attn {tuple(teacher_attn.shape)}")
    s, t = student_attn.float(), teacher_attn.detach().float()
    hs, ht = s.shape[1], t.shape[1]
    if ht != hs:
        if ht % hs:
            raise ValueError(f"attention_loss: teacher_attn has {ht} heads, not a multiple of the student's {hs}")
    if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(f"attention_loss: teacher_attn: expected [batch, heads, queries, keys] = "
                         f"[{s.shape[0]}, *, {s.shape[2]}, {s.shape[3]}], got {tuple(t.shape)}")
    if kind == "kl":
        log_s = F.log_softmax(s, -1) if from_logits else s.clamp_min(1e-12).log()
        log_t = F.log_softmax(t, -1) if from_logits else t.clamp_min(1e-12).log()
        if ht != hs:  # average the teacher's distributions, then compare
            log_t = _group_heads(log_t.exp(), hs).clamp_min(1e-12).log()
        p_t = log_t.exp()
        return (p_t * (log_t - log_s)).sum(-1).mean()
    if from_logits:
        s, t = s.softmax(-1), t.softmax(-1)
    if ht != hs:
        t = _group_heads(t, hs)
    return F.mse_loss(s, t)
