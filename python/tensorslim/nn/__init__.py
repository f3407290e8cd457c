"""Compressed modules: each holds only its packed form and runs a real kernel."""
from .binary_linear import BinaryLinear, TernaryLinear
from .compressed_linear import CompressedLinear
from .int8_conv import FoldedBatchNorm, Int8Conv1d, Int8Conv2d
from .int8_linear import Int8Linear
from .lowbit_linear import LowBitLinear
from .expert_linears import ExpertLinears
from .lowrank_conv import CPConv2d, TuckerConv2d
from .lowrank_linear import LowRankLinear
from .projected_attention import ProjectedMultiheadAttention
from .quantized_embedding import QuantizedEmbedding, QuantizedEmbeddingBag
from .sparse_conv import CSRSparseConv1d, CSRSparseConv2d, NMSparseConv1d, NMSparseConv2d
from .sparse_linear import CSRSparseLinear, NMSparseLinear
from .w4a8_linear import W4A8Linear
from .weight_only_linear import WeightOnlyLinear

# kind name in saved files -> module class (see io.py)
COMPRESSED_MODULES = {cls.kind: cls for cls in (WeightOnlyLinear, LowBitLinear, Int8Linear,
                                                BinaryLinear, TernaryLinear, W4A8Linear,
                                                LowRankLinear, TuckerConv2d, CPConv2d, NMSparseLinear,
                                                CSRSparseLinear, NMSparseConv2d, CSRSparseConv2d, NMSparseConv1d,
                                                CSRSparseConv1d, QuantizedEmbedding, QuantizedEmbeddingBag,
                                                Int8Conv1d, Int8Conv2d, FoldedBatchNorm)}

# kinds a saved file lists that restructure a layer without compressing it (its children may
# be compressed): io saves and loads them with the compressed ones; summaries leave them out
STRUCTURAL_MODULES = {cls.kind: cls for cls in (ProjectedMultiheadAttention, ExpertLinears)}
SAVED_MODULES = {**COMPRESSED_MODULES, **STRUCTURAL_MODULES}

__all__ = ["COMPRESSED_MODULES", "STRUCTURAL_MODULES", "SAVED_MODULES", "ProjectedMultiheadAttention", "ExpertLinears", "CompressedLinear", "WeightOnlyLinear", "LowBitLinear", "Int8Linear",
           "BinaryLinear", "TernaryLinear", "W4A8Linear", "LowRankLinear", "TuckerConv2d", "CPConv2d",
           "NMSparseLinear", "CSRSparseLinear", "NMSparseConv2d", "CSRSparseConv2d", "NMSparseConv1d",
           "CSRSparseConv1d", "QuantizedEmbedding", "QuantizedEmbeddingBag",
           "Int8Conv1d", "Int8Conv2d", "FoldedBatchNorm"]
