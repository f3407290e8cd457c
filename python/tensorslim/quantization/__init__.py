"""`ts.quantize(model, config)`: one verb for every quantization technique."""
from typing import Callable, Iterable, Optional

from torch import nn

from ..config import resolve_config
from ..report import Report
from .weight_only import TRANSFORMS as _WEIGHT_ONLY

_TRANSFORMS = {**_WEIGHT_ONLY}


def quantize(model: nn.Module, config, calib_data: Optional[Iterable] = None, *,
             forward_loop: Optional[Callable[[nn.Module], None]] = None,
             progress: bool = True) -> Report:
    """Quantize `model` in place with `config` (a config object or a preset name).

    calib_data / forward_loop feed calibration for techniques that need it; weight-only
    round-to-nearest does not. Returns a Report of what changed and what was skipped.
    """
    cfg = resolve_config(config)
    transform = _TRANSFORMS.get(type(cfg))
    if transform is None:
        raise TypeError(f"{type(cfg).__name__} is not a quantization config")
    if calib_data is not None and forward_loop is not None:
        raise ValueError("pass calib_data or forward_loop, not both")
    return transform(model, cfg, progress=progress)


__all__ = ["quantize"]
