"""nn.Linear with INT8/INT4 weights: packed codes + fp32 scales (+ uint8 zero points)."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import get_format
from .packed_linear import PackedLinear


class WeightOnlyLinear(PackedLinear):
    """y = x @ dequantize(qweight).T + bias, computed by a dequant-fused kernel.

    Buffers (the whole state): qweight [out, packed in], scales fp32 [out, in / group],
    zero_points uint8 (asymmetric formats only), bias fp32 (if the layer had one).
    """

    kind = "weight_only_linear"

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int,
                 bias: bool = True, backend: str = "auto", device=None):
        super().__init__()
        spec = get_format(fmt)
        if not spec.is_integer:
            raise ValueError(f"WeightOnlyLinear holds integer formats; use LowBitLinear for {fmt}")
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.backend = fmt, group_size, backend
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, spec.packed_cols(in_features),
                                                    dtype=spec.code_dtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        zps = torch.zeros(out_features, groups, dtype=torch.uint8, device=device) if spec.has_zero_point else None
        self.register_buffer("zero_points", zps)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: Optional[int] = None,
                    backend: str = "auto") -> "WeightOnlyLinear":
        """Quantize a trained nn.Linear; group_size None means one scale per output channel."""
        group = group_size or linear.in_features
        mod = cls(linear.in_features, linear.out_features, fmt, group, linear.bias is not None,
                  backend, device=linear.weight.device)
        with torch.no_grad():
            q, scales, zps = ops.quantize(linear.weight.detach(), fmt, group)
            mod.qweight.copy_(q)
            mod.scales.copy_(scales)
            if zps is not None:
                mod.zero_points.copy_(zps)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach().float())
        return mod

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                   fmt: str, group_size: int, bias: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> "WeightOnlyLinear":
        """A layer from integer codes an algorithm chose itself (GPTQ, AWQ): codes int [out, in]
        in the format's range, scales fp32 [out, in / group_size], zero points uint8 (or None
        for symmetric formats); dequantized weight = (code - zero point) * scale."""
        spec = get_format(fmt)
        out_features, in_features = codes.shape
        groups = in_features // group_size if group_size > 0 else 0
        if scales.shape != (out_features, groups):
            raise ValueError(f"from_codes: scales must be [{out_features}, {groups}], got {tuple(scales.shape)}")
        if spec.has_zero_point and (zero_points is None or zero_points.shape != scales.shape):
            raise ValueError(f"from_codes: format {fmt} needs zero_points of shape {tuple(scales.shape)}")
        if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
            raise ValueError(f"from_codes: codes must lie in [{spec.qmin}, {spec.qmax}] for {fmt}")
        mod = cls(in_features, out_features, fmt, group_size, bias is not None, backend,
                  device=codes.device)
        codes = codes.to(torch.int32)
        if spec.bits == 4:
            packed = ops.pack_int4(codes)
        elif spec.bits == 8:
            packed = codes.to(spec.code_dtype)
        elif hasattr(ops, "pack_codes"):
            packed = ops.pack_codes(codes, fmt)
        else:
            raise ValueError(f"from_codes: no packer for the {spec.bits}-bit format {fmt}")
        with torch.no_grad():
            mod.qweight.copy_(packed)
            mod.scales.copy_(scales)
            if spec.has_zero_point:
                mod.zero_points.copy_(zero_points)
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_weight_only(x, self.qweight, self.scales, self.zero_points, self.bias,
                                      self.fmt, self.group_size, self.in_features, self.backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize(self.qweight, self.scales, self.zero_points, self.fmt, self.group_size,
                              self.in_features, dtype)
