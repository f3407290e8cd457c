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
from .config import Binary, Ternary  # noqa: E402
from .nn import BinaryLinear, TernaryLinear  # noqa: E402
from .qat import QATLinear, convert, prepare_qat  # noqa: E402

__all__ = [
    "Config", "Int4WeightOnly", "Int8WeightOnly", "IntWeightOnly", "PRESETS", "FORMATS", "PER_TENSOR",
    "WeightOnlyLinear", "quantize", "summary", "Report", "save", "load", "ops",
]
__all__ += ["Binary", "Ternary", "BinaryLinear", "TernaryLinear", "prepare_qat", "convert", "QATLinear"]
from .config import FP8WeightOnly, MXFP4, NVFP4  # noqa: E402
from .nn import LowBitLinear  # noqa: E402
__all__ += ["FP8WeightOnly", "NVFP4", "MXFP4", "LowBitLinear"]
from .config import Int8Dynamic, W8A8  # noqa: E402
from .nn import Int8Linear  # noqa: E402
__all__ += ["W8A8", "Int8Dynamic", "Int8Linear"]
from . import eval  # noqa: F401,E402  (ts.eval.perplexity, ts.eval.load_minilm, ...)
from .config import AWQ, GPTQ  # noqa: E402
__all__ += ["AWQ", "GPTQ"]
