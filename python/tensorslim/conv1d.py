"""transformers' Conv1D (GPT-2 and its kin: y = x @ W + b with W stored [in, out]) is an
nn.Linear with weight W.T; every recipe selects nn.Linear layers, so a transform runs with
each Conv1D shown to it as that nn.Linear.

`conv1d_as_linear(model)`: each Conv1D becomes an nn.Linear holding a transposed copy of its
weight (and sharing its bias). Afterwards a layer the transform left as that nn.Linear
(skipped, or only edited by a fold such as SmoothQuant's or AWQ's) becomes its original
Conv1D again with the edited values, so skipped layers keep their class and saved layout;
the rest are compressed modules. Report rows name them Conv1D.
"""
import sys
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .report import Report


def conv1d_class() -> Optional[type]:
    """transformers' Conv1D if transformers is loaded (a model holding one has loaded it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(mod: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(mod, cls)


def linear_shape(mod: nn.Module) -> Optional[Tuple[int, int]]:
    """(in_features, out_features) of an nn.Linear or a Conv1D, else None."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if is_conv1d(mod):  # its size attributes, which a pruned model's load sets before any weight
        return int(mod.nx), int(mod.nf)
    return None


def conv1d_types() -> Tuple[type, ...]:
    """(Conv1D,) when transformers is loaded, else (): for isinstance checks beside nn.Linear."""
    cls = conv1d_class()
    return (cls,) if cls is not None else ()


def feature_dims(mod: nn.Module) -> Tuple[int, int]:
    """(weight dim indexing output features, weight dim indexing input features): Conv1D
    stores [in, out], so (1, 0); nn.Linear (and every conv, [out, in, ...]) (0, 1)."""
    return (1, 0) if is_conv1d(mod) else (0, 1)


def feature_attrs(mod: nn.Module) -> Tuple[str, str]:
    """Names of the (output, input) size attributes: Conv1D's nf / nx, nn.Linear's."""
    return ("nf", "nx") if is_conv1d(mod) else ("out_features", "in_features")


def out_in(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """t, shaped like mod's weight, as [out, in, ...] (the layout every per-row rule assumes):
    Conv1D's transposed (a view; transposing again gives its own layout back), others as is."""
    return t.t() if is_conv1d(mod) else t


def as_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear computing what `conv` computes: weight = conv.weight.T (a copy), its bias."""
    w = conv.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    lin.bias = conv.bias
    return lin


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def _restore(model: nn.Module, name: str, conv: nn.Module, lin: nn.Linear) -> None:
    """Put `conv` back where `lin` still stands, carrying over edits made to lin."""
    try:
        if model.get_submodule(name) is not lin:
            return  # replaced by a compressed module
    except AttributeError:
        return
    conv.weight.copy_(lin.weight.t())
    if lin.bias is not conv.bias:
        conv.bias = lin.bias
    _set(model, name, conv)


@contextmanager
def conv1d_as_linear(model: nn.Module):
    """Inside: every Conv1D of model is an equivalent nn.Linear. Yields the set of their names."""
    cls = conv1d_class()
    convs: Dict[str, nn.Module] = {}
    if cls is not None and isinstance(model, nn.Module):
        convs = {n: m for n, m in model.named_modules() if n and isinstance(m, cls)}
    linears = {n: as_linear(m) for n, m in convs.items()}  # all built before any swap
    for n, lin in linears.items():
        _set(model, n, lin)
    try:
        yield set(convs)
    finally:
        for n, conv in convs.items():
            _restore(model, n, conv, linears[n])


def name_conv1d_rows(report: Report, names: set) -> Report:
    """Report rows of layers that were Conv1D say so (the transform saw an nn.Linear)."""
    for c in report.changes:
        if c.name in names and c.module_type == "Linear":
            c.module_type = "Conv1D"
    return report
