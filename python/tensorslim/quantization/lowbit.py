"""FP8 / NVFP4 / MXFP4 weight-only quantization of nn.Linear layers (round to nearest,
scales chosen so each block's max maps to the format's max)."""
from typing import Optional

from torch import nn

from ..config import MXFP4, NVFP4, FP8WeightOnly
from ..formats import get_format
from ..nn import LowBitLinear
from ..transforms import replace_modules
from .registry import register_transform


def _group(cfg) -> Optional[int]:
    return cfg.group_size  # None: per output channel (FP8); NVFP4 / MXFP4 fix their block


def _check(cfg, name: str, mod: nn.Linear) -> Optional[str]:
    # Any in_features: a row's last block holds what is left (ceil(in / block) scales).
    if not mod.weight.dtype.is_floating_point:
        return f"weight dtype {mod.weight.dtype} is not a float type"
    if mod.weight.device.type != "cpu":
        return f"weight is on {mod.weight.device}; the {cfg.format_name} kernels run on the CPU"
    return None


@register_transform(FP8WeightOnly, NVFP4, MXFP4)
def apply_lowbit(model: nn.Module, cfg, forward_loop=None, progress: bool = True):
    fmt = get_format(cfg.format_name).name

    def convert(name, mod):
        new = LowBitLinear.from_linear(mod, fmt, _group(cfg), cfg.backend)
        return new, new.describe()

    return replace_modules(model, cfg, (nn.Linear,), convert, lambda n, m: _check(cfg, n, m),
                           progress, desc=f"{fmt} weight-only")
