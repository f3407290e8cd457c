"""nn.Linear with INT8/INT4 weights: packed codes + fp32 scales (+ uint8 zero points)."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import get_format


class WeightOnlyLinear(nn.Module):
    """y = x @ dequantize(qweight).T + bias, computed by a dequant-fused kernel.

    Buffers (the whole state): qweight [out, packed in], scales fp32 [out, in / group],
    zero_points uint8 (asymmetric formats only), bias fp32 (if the layer had one).
    """

    kind = "weight_only_linear"

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int,
                 bias: bool = True, backend: str = "auto", device=None):
        super().__init__()
        spec = get_format(fmt)
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
    def from_spec(cls, spec: dict, device=None) -> "WeightOnlyLinear":
        """An empty module of the shape a saved file describes (see io.load)."""
        return cls(spec["in_features"], spec["out_features"], spec["format"], spec["group_size"],
                   spec["bias"], device=device)

    def spec(self) -> dict:
        return {"kind": self.kind, "format": self.fmt, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_weight_only(x, self.qweight, self.scales, self.zero_points, self.bias,
                                      self.fmt, self.group_size, self.in_features, self.backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize(self.qweight, self.scales, self.zero_points, self.fmt, self.group_size,
                              self.in_features, dtype)

    def describe(self) -> str:
        """The format as summaries print it, e.g. 'int4 g128' or 'int8 per-channel'."""
        group = "per-channel" if self.group_size == self.in_features else f"g{self.group_size}"
        return f"{self.fmt} {group}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt}, group_size={self.group_size}, bias={self.bias is not None}")
