"""`ts.quantize(model, config)`: one verb for every quantization technique."""
from typing import Callable, Iterable, Optional

from torch import nn

from ..config import resolve_config
from ..report import Report
from . import weight_only  # noqa: F401  (each technique module registers its transforms)
from . import gptq, awq  # noqa: F401,E402  (calibrating weight-only algorithms)
from . import binary  # noqa: F401
from . import lowbit  # noqa: F401
from . import w8a8  # noqa: F401,E402  (W8A8 / Int8Dynamic, SmoothQuant)
from .calibrate import make_forward_loop
from .registry import TRANSFORMS


def quantize(model: nn.Module, config, calib_data: Optional[Iterable] = None, *,
             forward_loop: Optional[Callable[[nn.Module], None]] = None,
             progress: bool = True) -> Report:
    """Quantize `model` in place with `config` (a config object or a preset name).

    calib_data (an iterable of model inputs: tensors, tuples or dicts) or forward_loop
    (a callable run as forward_loop(model)) feed calibration for techniques that need it;
    weight-only round-to-nearest does not. Returns a Report of what changed and what was
    skipped.
    """
    cfg = resolve_config(config)
    transform = TRANSFORMS.get(type(cfg))
    if transform is None:
        raise TypeError(f"{type(cfg).__name__} is not a quantization config")
    loop = make_forward_loop(calib_data, forward_loop, progress)
    return transform(model, cfg, forward_loop=loop, progress=progress)


__all__ = ["quantize"]
