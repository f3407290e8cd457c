"""Every native kernel, exposed once as a torch.library custom op (namespace `tensorslim`).

Each op has a fake (meta) implementation, so torch.compile and meta tensors work, a
CPU and a CUDA kernel from the native core, and a plain-PyTorch reference that
follows the same specification bit for bit (backend="reference").
One module per kernel family; this package re-exports their public functions.
"""
from .weight_only import (BACKENDS, dequantize, dequantize_reference, linear_weight_only,
                          pack_int4, quantize, quantize_reference, unpack_int4)
from .binary import (binarize, binary_linear, pack_signs, pack_trits, ternarize, ternary_linear,  # noqa: F401
                     unpack_signs, unpack_trits, xnor_linear)

__all__ = ["BACKENDS", "quantize", "dequantize", "linear_weight_only", "quantize_reference",
           "dequantize_reference", "pack_int4", "unpack_int4"]
from .lowbit import (LOWBIT_BACKENDS, dequantize_lowbit, linear_lowbit, pack_bits, pack_codes,  # noqa: F401
                     quantize_lowbit, unpack_bits)
from . import calibration  # noqa: F401  (GPTQ / AWQ cores: ops.calibration.gptq_quantize, ...)
from .int8 import (linear_int8, linear_w8a8, quantize_per_token, quantize_static)  # noqa: F401,E402
