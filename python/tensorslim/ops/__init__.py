"""Every native kernel, exposed once as a torch.library custom op (namespace `tensorslim`).

Each op has a fake (meta) implementation, so torch.compile and meta tensors work, a
CPU and a CUDA kernel from the native core, and a plain-PyTorch reference that
follows the same specification bit for bit (backend="reference").
One module per kernel family; this package re-exports their public functions.
"""
from .weight_only import (BACKENDS, dequantize, dequantize_reference, linear_weight_only,
                          pack_int4, quantize, quantize_reference, unpack_int4)

__all__ = ["BACKENDS", "quantize", "dequantize", "linear_weight_only", "quantize_reference",
           "dequantize_reference", "pack_int4", "unpack_int4"]
