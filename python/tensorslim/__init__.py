"""tensorslim: make trained PyTorch models smaller and faster.

    import tensorslim as ts
    ts.quantize(model, ts.Int4WeightOnly(group_size=128))
    print(ts.summary(model))
    ts.save(model, "model.slim.safetensors")
"""
__version__ = "0.1.0"

from ._native import _C  # noqa: F401  (loads the native core first)
from . import ops  # noqa: F401
from .config import Config, Int4WeightOnly, Int8WeightOnly, IntWeightOnly, PRESETS
from .formats import FORMATS, PER_TENSOR
from .io import load, save
from .nn import WeightOnlyLinear
from .quantization import quantize
from .report import Report, summary

__all__ = [
    "Config", "Int4WeightOnly", "Int8WeightOnly", "IntWeightOnly", "PRESETS", "FORMATS", "PER_TENSOR",
    "WeightOnlyLinear", "quantize", "summary", "Report", "save", "load", "ops",
]
