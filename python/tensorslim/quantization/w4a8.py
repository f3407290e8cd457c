"""W4A8: every selected nn.Linear becomes a W4A8Linear (INT4 weights, round to nearest, in
groups; INT8 activations quantized per token at run time). No calibration."""
from typing import Optional

from torch import nn

from ..config import W4A8
from ..nn import W4A8Linear
from ..transforms import replace_modules
from .registry import register_transform


def _check(cfg: W4A8, name: str, mod: nn.Linear) -> Optional[str]:
    # Any in_features: the last group of a row holds what is left (ceil(in / group) scales).
    if not mod.weight.dtype.is_floating_point:
        return f"weight dtype {mod.weight.dtype} is not a float type"
    if mod.weight.device.type != "cpu":
        return f"weight is on {mod.weight.device}; the W4A8 kernel runs on the CPU"
    return None


@register_transform(W4A8)
def apply_w4a8(model: nn.Module, cfg: W4A8, forward_loop=None, progress: bool = True):
    def convert(name, mod):
        new = W4A8Linear.from_linear(mod, cfg.format_name, cfg.group_size, cfg.backend)
        return new, new.describe()

    return replace_modules(model, cfg, (nn.Linear,), convert, lambda n, m: _check(cfg, n, m),
                           progress, desc=f"w4a8 {cfg.format_name}")
