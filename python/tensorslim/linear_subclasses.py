"""nn.Linear subclasses that compute what nn.Linear computes, shown to a transform as nn.Linear.

Every recipe selects layers of exactly nn.Linear (a subclass may compute something else: a
LoRA layer, a quantized one). Two kinds are known to compute x @ W.T + b: subclasses that keep
nn.Linear's forward (torch's NonDynamicallyQuantizableLinear, a library's marker class), and
the classes in EQUIVALENT, whose forward is that product written out (transformers' Falcon
keeps every projection in a FalconLinear).
While a transform runs, each becomes an nn.Linear holding the same weight and bias parameters;
afterwards a layer the transform left as that nn.Linear becomes its original again (with any
parameter a fold replaced), so skipped layers keep their class. Report rows name the class.
"""
from contextlib import contextmanager
from typing import Dict

from torch import nn
from torch.nn.utils import parametrize

from .nn.int8_conv_chain import has_hooks
from .report import Report
from .transforms import _set_submodule

# "module.qualname" of nn.Linear subclasses whose own forward computes F.linear(x, weight, bias)
EQUIVALENT = {"transformers.models.falcon.modeling_falcon.FalconLinear"}


def stands_for_linear(mod: nn.Module) -> bool:
    """Whether `mod` is an nn.Linear subclass computing nn.Linear's product from its own weight and
    bias parameters, with nothing a plain nn.Linear standing in would drop: no hooks (torch's
    prune utility, ts.prune's masks), no buffers, no parametrization (its class is generated)."""
    cls = type(mod)
    if cls is nn.Linear or not isinstance(mod, nn.Linear) or parametrize.is_parametrized(mod):
        return False
    if has_hooks(mod) or next(mod.buffers(recurse=False), None) is not None:
        return False
    if not isinstance(mod._parameters.get("weight"), nn.Parameter) or \
            (mod.bias is not None and not isinstance(mod._parameters.get("bias"), nn.Parameter)):
        return False
    return cls.forward is nn.Linear.forward or f"{cls.__module__}.{cls.__qualname__}" in EQUIVALENT


def _plain(mod: nn.Linear) -> nn.Linear:
    lin = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
    lin.weight, lin.bias = mod.weight, mod.bias
    lin.train(mod.training)
    return lin


@contextmanager
def subclasses_as_linear(model: nn.Module):
    """Inside: every nn.Linear subclass that computes nn.Linear's product is an nn.Linear (not
    the out_proj of an nn.MultiheadAttention, which multiplies by its weight itself). Yields
    {name: class name}."""
    inside_attention = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    subs: Dict[str, nn.Module] = {n: m for n, m in model.named_modules()
                                  if n and n not in inside_attention and stands_for_linear(m)}
    plain = {n: _plain(m) for n, m in subs.items()}
    for n, lin in plain.items():
        _set_submodule(model, n, lin)
    try:
        yield {n: type(m).__name__ for n, m in subs.items()}
    finally:
        for n, original in subs.items():
            try:
                still = model.get_submodule(n) is plain[n]
            except AttributeError:
                still = False
            if still:  # left as the stand-in: the original again, with the parameters it now has
                original.weight, original.bias = plain[n].weight, plain[n].bias
                _set_submodule(model, n, original)


def name_subclass_rows(report: Report, names: Dict[str, str]) -> Report:
    """Report rows of layers that were nn.Linear subclasses name their class."""
    for c in report.changes:
        if c.name in names and c.module_type == "Linear":
            c.module_type = names[c.name]
    return report
