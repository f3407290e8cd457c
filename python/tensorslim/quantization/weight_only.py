"""Weight-only integer quantization of nn.Linear layers and embedding tables.

Round to nearest here; calibrating algorithms (AWQ, GPTQ) register in ALGORITHMS and
produce the same packed WeightOnlyLinear layers.
"""
from typing import Callable, Dict, Optional

from torch import nn

from ..config import Int4WeightOnly, Int8WeightOnly, IntWeightOnly, WEIGHT_ONLY_ALGORITHMS
from ..formats import integer_format
from ..nn import WeightOnlyLinear
from ..transforms import replace_modules
from . import embedding
from .registry import register_transform


def _check(cfg, name: str, mod: nn.Linear) -> Optional[str]:
    # Any width: ceil(in_features / group_size) groups, the last one short when need be.
    if not mod.weight.dtype.is_floating_point:
        return f"weight dtype {mod.weight.dtype} is not a float type"
    if mod.weight.device.type == "meta":
        return "weight is on the meta device (no data to quantize)"
    return None


# algorithm name -> fn(model, cfg, forward_loop, progress) -> Report
ALGORITHMS: Dict[str, Callable] = {}


def register_algorithm(name: str, description: str):
    def wrap(fn):
        ALGORITHMS[name] = fn
        WEIGHT_ONLY_ALGORITHMS[name] = description
        return fn

    return wrap


def check_linear(cfg, name: str, mod: nn.Linear) -> Optional[str]:
    """Why a weight-only algorithm cannot quantize this layer (None if it can)."""
    return _check(cfg, name, mod)


@register_transform(Int8WeightOnly, Int4WeightOnly, IntWeightOnly)
def apply_weight_only(model: nn.Module, cfg, forward_loop=None, progress: bool = True):
    tables = embedding.plan(model, cfg)  # built first, swapped in only once the linears succeed
    return embedding.swap(model, tables, _quantize_linears(model, cfg, forward_loop, progress))


def _quantize_linears(model: nn.Module, cfg, forward_loop, progress: bool):
    algorithm = getattr(cfg, "algorithm", "rtn")
    if algorithm != "rtn":
        return ALGORITHMS[algorithm](model, cfg, forward_loop=forward_loop, progress=progress)
    spec = integer_format(cfg.bits, cfg.symmetric)

    def convert(name, mod):
        new = WeightOnlyLinear.from_linear(mod, spec.name, cfg.group_size, cfg.backend)
        return new, new.describe()

    return replace_modules(model, cfg, (nn.Linear,), convert, lambda n, m: _check(cfg, n, m),
                           progress, desc=f"{spec.name} weight-only")
