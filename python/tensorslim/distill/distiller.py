"""Distiller: runs a frozen teacher beside the student inside the user's training loop.

    d = ts.distill.Distiller(student, teacher, losses={"kd": 1.0, "hidden": 0.5},
                             feature_map={"encoder.2": "encoder.5"}, temperature=4.0, alpha=0.5)
    opt = torch.optim.AdamW(d.parameters())       # the student's and the projections'
    out = d(x, labels=y); out.loss.backward(); opt.step()

The teacher is frozen (requires_grad off), kept in eval mode (d.train() does not change it),
and run under torch.no_grad(), so no autograd graph of it is kept. Features are captured by
forward hooks on modules named as in model.named_modules(). The teacher is not a registered
submodule: d.parameters() and d.state_dict() are the student's and the projections' only.
"""
import math
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from .features import ATTENTION_KINDS, HIDDEN_KINDS, HiddenProjection, attention_loss, hidden_loss
from .kd import kd_loss

LOSS_NAMES = ("kd", "hidden", "attention")


def _first_tensor(out: Any) -> torch.Tensor:
    """A module's output as one tensor: itself, the first of a tuple, or .logits / .last_hidden_state."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for attr in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    raise TypeError(f"Distiller: cannot find a tensor in a module output of type {type(out).__name__}; "
                    "pass logits_fn=")


def _width(module: nn.Module) -> Optional[int]:
    for attr in ("out_features", "embedding_dim", "hidden_size"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else None


class DistillOutput(dict):
    """loss (weighted sum), logits (the student's output), terms (each unweighted loss)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, losses: Optional[Mapping[str, float]] = None,
                 feature_map: Optional[Mapping[str, str]] = None, temperature: float = 1.0, alpha: float = 0.5,
                 hidden_kind: str = "mse", attention_kind: str = "kl", top_k: Optional[int] = None,
                 reverse: bool = False, ignore_index: int = -100,
                 logits_fn: Callable[[Any], torch.Tensor] = _first_tensor,
                 example_inputs: Optional[tuple] = None):
        super().__init__()
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("Distiller: student and teacher must be nn.Modules")
        if student is teacher:
            raise ValueError("Distiller: student and teacher are the same module")
        losses = dict({"kd": 1.0} if losses is None else losses)
        if not losses:
            raise ValueError(f"Distiller: losses names no loss; expected some of {LOSS_NAMES}")
        for name, w in losses.items():
            if name not in LOSS_NAMES:
                raise ValueError(f"Distiller: unknown loss {name!r}; expected some of {LOSS_NAMES}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"Distiller: the weight of {name!r} must be a finite number >= 0, got {w!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"Distiller: temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Distiller: alpha must be a number in [0, 1], got {alpha!r}")
        feature_map = dict(feature_map or {})
        if ("hidden" in losses or "attention" in losses) and not feature_map:
            raise ValueError("Distiller: the 'hidden' / 'attention' losses need feature_map="
                             "{'student.module': 'teacher.module'}")
        if hidden_kind not in HIDDEN_KINDS or attention_kind not in ATTENTION_KINDS:
            raise ValueError(f"Distiller: hidden_kind in {HIDDEN_KINDS}, attention_kind in {ATTENTION_KINDS}")
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never saved
        self.losses, self.feature_map = losses, feature_map
        self.kd_options = dict(temperature=temperature, alpha=alpha, top_k=top_k, reverse=reverse,
                               ignore_index=ignore_index)
        self.hidden_kind, self.attention_kind, self.logits_fn = hidden_kind, attention_kind, logits_fn

        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for s_name, t_name in feature_map.items():
            if s_name not in s_mods:
                raise ValueError(f"Distiller: feature_map: the student has no module {s_name!r}")
            if t_name not in t_mods:
                raise ValueError(f"Distiller: feature_map: the teacher has no module {t_name!r}")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._feats: Dict[str, torch.Tensor] = {}
        self._hooks = []
        for i, (s_name, t_name) in enumerate(feature_map.items()):
            self._hooks.append(s_mods[s_name].register_forward_hook(self._saver(f"s{i}")))
            self._hooks.append(t_mods[t_name].register_forward_hook(self._saver(f"t{i}")))
        self.projections = nn.ModuleDict()
        if "hidden" in losses:
            try:
                self._build_projections(s_mods, t_mods, example_inputs)
            except BaseException:  # no hooks left on the user's models by a Distiller that never was
                self.remove_hooks()
                raise

    def _saver(self, key: str):
        def hook(_module, _inputs, output):
            self._feats[key] = _first_tensor(output)
        return hook

    def _build_projections(self, s_mods, t_mods, example_inputs) -> None:
        """A HiddenProjection for each mapped pair whose widths differ (known from the modules,
        or from one forward pass over example_inputs)."""
        widths = {}
        if example_inputs is not None:
            was_training = self.student.training
            self.student.eval()  # no batch-norm statistics updated by this measuring pass
            try:
                with torch.no_grad():
                    self.student(*example_inputs)
                    self.teacher(*example_inputs)
            finally:
                self.student.train(was_training)
            widths = {k: v.shape[-1] for k, v in self._feats.items()}
            self._feats.clear()
        for i, (s_name, t_name) in enumerate(self.feature_map.items()):
            ws = widths.get(f"s{i}", _width(s_mods[s_name]))
            wt = widths.get(f"t{i}", _width(t_mods[t_name]))
            if ws is None or wt is None:
                raise ValueError(f"Distiller: cannot tell the widths of {s_name!r} / {t_name!r}; "
                                 "pass example_inputs=(x,) so one forward pass measures them")
            if ws != wt:
                self.projections[str(i)] = HiddenProjection(ws, wt)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode (dropout off, BN frozen)
        return self

    def remove_hooks(self) -> None:
        """Takes the feature hooks off the student and teacher (also on leaving a `with` block);
        the hidden / attention terms cannot be computed after that."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def forward(self, *args, labels: Optional[torch.Tensor] = None, **kwargs) -> DistillOutput:
        self._feats.clear()
        self.teacher.eval()
        with torch.no_grad():
            t_logits = self.logits_fn(self.teacher(*args, **kwargs))
        s_out = self.student(*args, **kwargs)
        s_logits = self.logits_fn(s_out)
        terms: Dict[str, torch.Tensor] = {}
        if "kd" in self.losses:
            terms["kd"] = kd_loss(s_logits, t_logits, labels=labels, **self.kd_options)
        for i, (s_name, t_name) in enumerate(self.feature_map.items()):
            missing = [n for n, k in ((s_name, f"s{i}"), (t_name, f"t{i}")) if k not in self._feats]
            if missing:
                self._feats.clear()
                raise ValueError(f"Distiller: feature_map module {missing[0]!r} did not run in this forward "
                                 f"(replaced after the Distiller was built, or its hooks removed: build the "
                                 f"Distiller after compressing the student)")
            s_f, t_f = self._feats[f"s{i}"], self._feats[f"t{i}"]
            if "hidden" in self.losses:
                proj = self.projections[str(i)] if str(i) in self.projections else None
                terms[f"hidden.{i}"] = hidden_loss(s_f, t_f, self.hidden_kind, proj)
            if "attention" in self.losses:
                terms[f"attention.{i}"] = attention_loss(s_f, t_f, self.attention_kind)
        self._feats.clear()
        loss = sum(self.losses[k.split(".")[0]] * v for k, v in terms.items())
        return DistillOutput(loss=loss, logits=s_out, terms=terms)
