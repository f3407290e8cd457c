"""nn.Linear with FP8 / NVFP4 / MXFP4 (or any other table format) weights: packed codes,
block scales (fp32, or one E4M3 / E8M0 byte per block), NVFP4's tensor scale and bias."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import get_format
from .packed_linear import PackedLinear
from .compute_dtype import stored_bias


class LowBitLinear(PackedLinear):
    """y = x @ dequantize_lowbit(qweight).T + bias, computed by a decode-fused kernel.

    Buffers (the whole state): qweight uint8 [out, packed in], scales [out, ceil(in / group)]
    (fp32, or uint8 E4M3 / E8M0 codes; a short last group when group does not divide in), zero_points uint8 (uint<N> only), tensor_scale
    fp32 [1] (NVFP4 only), bias fp32 (if the layer had one).
    """

    kind = "lowbit_linear"

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: Optional[int] = None,
                 bias: bool = True, backend: str = "auto", device=None):
        super().__init__()
        spec = get_format(fmt)
        group = group_size or spec.block_size or in_features
        # validates, names the problem; ceil(in / group) groups, the last one may be short
        _, groups = ops.lowbit.scale_shape(spec, out_features, in_features, group)
        if group == -1:
            raise ValueError("LowBitLinear: per-tensor weight scales are not supported (use a group size)")
        if backend not in ("auto", "native", "scalar", "reference"):
            raise ValueError(f"LowBitLinear: backend must be auto, native, scalar or reference, got {backend!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.backend = fmt, group, backend
        self._register_packed(spec, in_features, out_features, groups, bias, device)
        ts = torch.ones(1, dtype=torch.float32, device=device) if spec.has_tensor_scale else None
        self.register_buffer("tensor_scale", ts)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: Optional[int] = None,
                    backend: str = "auto") -> "LowBitLinear":
        """Quantize a trained nn.Linear; group_size None: the format's block size, else per channel."""
        mod = cls(linear.in_features, linear.out_features, fmt, group_size, linear.bias is not None,
                  backend, device=linear.weight.device)
        with torch.no_grad():
            q, scales, zps, ts = ops.quantize_lowbit(linear.weight.detach(), fmt, mod.group_size)
            mod.qweight.copy_(q)
            mod.scales.copy_(scales)
            if zps is not None:
                mod.zero_points.copy_(zps)
            if ts is not None:
                mod.tensor_scale.copy_(ts)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach().float())
        return mod

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.packed_tensors("qweight", "scales", "zero_points", "tensor_scale", "bias")
        if t is not None:
            y = ops.lowbit.linear_lowbit_direct(x, *t, self.fmt, self.group_size, self.in_features, self.backend)
            if y is not None:
                return y
        return ops.linear_lowbit(x, self.qweight, self.scales, self.zero_points, self.tensor_scale,
                                 stored_bias(self), self.fmt, self.group_size, self.in_features,
                                 self.backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_lowbit(self.qweight, self.scales, self.zero_points, self.tensor_scale,
                                     self.fmt, self.group_size, self.in_features, dtype)
