"""Binary (XNOR-Net) and ternary (TWN) weights for nn.Linear layers."""
from typing import Optional

from torch import nn

from ..config import Binary, Ternary
from ..nn import BinaryLinear, TernaryLinear
from ..transforms import replace_modules
from .registry import register_transform


def _check(name: str, mod: nn.Linear) -> Optional[str]:
    if not mod.weight.dtype.is_floating_point:
        return f"weight dtype {mod.weight.dtype} is not a float type"
    if mod.weight.device.type != "cpu":
        return f"weight is on {mod.weight.device}; binary/ternary kernels run on the CPU"
    return None


@register_transform(Binary, Ternary)
def apply_binary(model: nn.Module, cfg, forward_loop=None, progress: bool = True):
    if isinstance(cfg, Binary):
        def convert(name, mod):
            new = BinaryLinear.from_linear(mod, cfg.activations, cfg.backend)
            return new, new.describe()
        desc = "xnor" if cfg.activations else "binary"
    else:
        def convert(name, mod):
            new = TernaryLinear.from_linear(mod, cfg.backend)
            return new, new.describe()
        desc = "ternary"
    return replace_modules(model, cfg, (nn.Linear,), convert, _check, progress, desc=desc)
