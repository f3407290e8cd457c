"""tensorslim: make trained PyTorch models smaller and faster.

    import tensorslim as ts
    ts.quantize(model, ts.Int4WeightOnly(group_size=128))
    print(ts.summary(model))
    ts.save(model, "model.slim.safetensors")
"""
__version__ = "0.1.0"

from ._native import _C  # noqa: F401  (loads the native core first)
from . import distill, eval, ops, pruning, sparsity  # noqa: F401  (ts.distill.kd_loss, ts.pruning.Schedule, ...)
from .attention import unpack_attention
from .config import (AWQ, GPTQ, MXFP4, NVFP4, PRESETS, W4A8, W8A8, Binary, Config,
                     FP8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, IntWeightOnly,
                     Ternary)
from .formats import FORMATS, PER_TENSOR
from .hf import from_pretrained
from .io import load, save
from .meta_parameters import empty_parameters
from .lowrank import CP, SVD, Tucker, factorize
from .nn import (BinaryLinear, CPConv2d, CSRSparseConv1d, CSRSparseConv2d, CSRSparseLinear, Int8Linear,
                 LowBitLinear, LowRankLinear, NMSparseConv1d, NMSparseConv2d, NMSparseLinear,
                 ProjectedMultiheadAttention, QuantizedEmbedding, QuantizedEmbeddingBag,
                 TernaryLinear, TuckerConv2d, W4A8Linear, WeightOnlyLinear)
from .pruning import ChannelPrune, Magnitude, RandomPrune, prune
from .qat import QATLinear, convert, prepare_qat
from .quantization import quantize
from .report import Report, summary
from .sparsity import NM, SparseStorage, Unstructured, sparsify
from . import hf_quantizer

hf_quantizer.install()  # transformers' from_pretrained loads compressed models (see hf_quantizer.py)

__all__ = [
    # configs and presets
    "Config", "PRESETS", "Int8WeightOnly", "Int4WeightOnly", "IntWeightOnly", "GPTQ", "AWQ",
    "W8A8", "Int8Dynamic", "W4A8", "FP8WeightOnly", "NVFP4", "MXFP4", "Binary", "Ternary",
    "SVD", "Tucker", "CP", "Magnitude", "RandomPrune", "ChannelPrune", "NM", "Unstructured",
    "SparseStorage",
    # verbs, reports, files
    "quantize", "prune", "sparsify", "factorize", "prepare_qat", "convert", "summary", "Report", "save", "load",
    "from_pretrained", "unpack_attention", "empty_parameters",
    # compressed modules
    "WeightOnlyLinear", "LowBitLinear", "Int8Linear", "BinaryLinear", "TernaryLinear", "W4A8Linear",
    "QATLinear", "LowRankLinear", "TuckerConv2d", "CPConv2d", "NMSparseLinear", "CSRSparseLinear",
    "NMSparseConv2d", "CSRSparseConv2d", "NMSparseConv1d", "CSRSparseConv1d", "QuantizedEmbedding", "QuantizedEmbeddingBag", "ProjectedMultiheadAttention",
    # formats and kernels
    "FORMATS", "PER_TENSOR", "ops", "eval", "distill", "pruning", "sparsity",
]
