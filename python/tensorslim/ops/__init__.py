"""Every native kernel, exposed once as a torch.library custom op (namespace `tensorslim`).

Each op has a fake (meta) implementation, so torch.compile and meta tensors work, a
CPU and a CUDA kernel from the native core, and a plain-PyTorch reference that
follows the same specification bit for bit (backend="reference").
One module per kernel family; this package re-exports their public functions.
"""
from . import conv_int8  # INT8 Conv1d / Conv2d: ops.conv_int8.conv_int8, ...
from . import calibration  # GPTQ / AWQ cores: ops.calibration.gptq_quantize, ...
from . import distill  # KD loss: ops.distill.kd_rows, ops.distill.kd_rows_reference
from . import lowrank  # SVD, whitening, Tucker-2, CP-ALS: ops.lowrank.svd, ...
from . import prune  # pruning cores: ops.prune.kth_smallest, keep_mask, score_histogram, ...
from . import sparse  # N:M and CSR storage: ops.sparse.nm_pack, nm_linear, csr_pack, csr_linear, ...
from .binary import (binarize, binary_linear, pack_signs, pack_trits, ternarize, ternary_linear,
                     unpack_signs, unpack_trits, xnor_linear)
from .int8 import linear_int8, linear_w8a8, quantize_per_token, quantize_static
from .lowbit import (LOWBIT_BACKENDS, dequantize_lowbit, linear_lowbit, pack_bits, pack_codes,
                     quantize_lowbit, unpack_bits)
from .w4a8 import W4A8_BACKENDS, linear_w4a8
from .weight_only import (BACKENDS, dequantize, dequantize_reference, linear_weight_only,
                          pack_int4, quantize, quantize_reference, unpack_int4)

__all__ = [
    "BACKENDS", "quantize", "dequantize", "linear_weight_only", "quantize_reference",
    "dequantize_reference", "pack_int4", "unpack_int4",
    "LOWBIT_BACKENDS", "quantize_lowbit", "dequantize_lowbit", "linear_lowbit", "pack_bits",
    "unpack_bits", "pack_codes",
    "binarize", "ternarize", "binary_linear", "xnor_linear", "ternary_linear", "pack_signs",
    "unpack_signs", "pack_trits", "unpack_trits",
    "quantize_per_token", "quantize_static", "linear_int8", "linear_w8a8",
    "W4A8_BACKENDS", "linear_w4a8",
    "calibration", "conv_int8", "distill", "lowrank", "prune", "sparse",
]
