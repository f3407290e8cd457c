"""nn.Linear with INT8/INT4 weights: packed codes + fp32 scales (+ uint8 zero points)."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import get_format, num_groups
from .packed_linear import PackedLinear
from .compute_dtype import stored_bias


@torch.no_grad()
def fill_from_linear(mod: nn.Module, linear: nn.Linear, quantize=None) -> nn.Module:
    """Round-to-nearest codes of linear's weight into an empty integer layer's qweight, scales,
    zero_points and bias buffers (in mod's format and group size); returns mod. `quantize`
    (weight, fmt, group) -> (codes, scales, zero points) defaults to ops.quantize."""
    q, scales, zps = (quantize or ops.quantize)(linear.weight.detach(), mod.fmt, mod.group_size)
    mod.qweight.copy_(q)
    mod.scales.copy_(scales)
    if zps is not None:
        mod.zero_points.copy_(zps)
    if linear.bias is not None:
        mod.bias.copy_(linear.bias.detach().float())
    return mod


class WeightOnlyLinear(PackedLinear):
    """y = (x * input_scale) @ dequantize(qweight).T + bias, computed by a dequant-fused kernel.

    Buffers (the whole state): qweight [out, packed in], scales fp32 [out, ceil(in / group)]
    (the last group is short when group_size does not divide in_features),
    zero_points uint8 (asymmetric formats only), bias fp32 (if the layer had one), and
    input_scale fp32 [in] (None unless an algorithm scaled the weight's input channels, as
    AWQ does when no operation before the layer can absorb its scales: the stored weight is
    W * s per input channel and input_scale = 1 / s, so the layer still computes x @ W.T).
    """

    kind = "weight_only_linear"

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int,
                 bias: bool = True, backend: str = "auto", device=None, input_scale: bool = False):
        super().__init__()
        spec = get_format(fmt)
        if not spec.is_integer:
            raise ValueError(f"WeightOnlyLinear holds integer formats; use LowBitLinear for {fmt}")
        if group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        groups = num_groups(in_features, group_size)
        if groups > 1 and group_size * spec.bits % 8:  # each group starts on a byte
            raise ValueError(f"group_size {group_size} times {spec.bits} bits must be a whole number of bytes "
                             f"for the packed format {fmt}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.backend = fmt, group_size, backend
        self._register_packed(spec, in_features, out_features, groups, bias, device)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32, device=device)
                             if input_scale else None)

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "WeightOnlyLinear":
        """An empty module of the shape a saved file describes (see io.load); files written
        before input scales existed have no "input_scale" key."""
        return cls(spec["in_features"], spec["out_features"], spec["format"], spec["group_size"],
                   spec["bias"], device=device, input_scale=bool(spec.get("input_scale", False)))

    def spec(self) -> dict:
        out = super().spec()
        if self.input_scale is not None:  # only then: files without input scales stay as before
            out["input_scale"] = True
        return out

    def describe(self) -> str:
        return super().describe() + (" input-scaled" if self.input_scale is not None else "")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", input_scale=True" if self.input_scale is not None else "")

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: Optional[int] = None,
                    backend: str = "auto") -> "WeightOnlyLinear":
        """Quantize a trained nn.Linear; group_size None means one scale per output channel."""
        group = group_size or linear.in_features
        mod = cls(linear.in_features, linear.out_features, fmt, group, linear.bias is not None,
                  backend, device=linear.weight.device)
        return fill_from_linear(mod, linear)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                   fmt: str, group_size: int, bias: Optional[torch.Tensor] = None,
                   backend: str = "auto", input_scale: Optional[torch.Tensor] = None) -> "WeightOnlyLinear":
        """A layer from integer codes an algorithm chose itself (GPTQ, AWQ): codes int [out, in]
        in the format's range, scales fp32 [out, ceil(in / group_size)], zero points uint8 (or None
        for symmetric formats); dequantized weight = (code - zero point) * scale.
        input_scale (fp32 [in], finite): multiplies the input before the kernel; the codes then
        encode the weight in the scaled domain (W * s for input_scale = 1 / s). It is copied."""
        spec = get_format(fmt)
        out_features, in_features = codes.shape
        groups = num_groups(in_features, group_size) if group_size > 0 else 0
        if scales.shape != (out_features, groups):
            raise ValueError(f"from_codes: scales must be [{out_features}, {groups}], got {tuple(scales.shape)}")
        if spec.has_zero_point and (zero_points is None or zero_points.shape != scales.shape):
            raise ValueError(f"from_codes: format {fmt} needs zero_points of shape {tuple(scales.shape)}")
        if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
            raise ValueError(f"from_codes: codes must lie in [{spec.qmin}, {spec.qmax}] for {fmt}")
        _check_input_scale(input_scale, in_features)
        mod = cls(in_features, out_features, fmt, group_size, bias is not None, backend,
                  device=codes.device, input_scale=input_scale is not None)
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
            if input_scale is not None:
                mod.input_scale.copy_(input_scale.detach().float())  # copy_: never shares storage
        return mod

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.packed_tensors("input_scale", "qweight", "scales", "zero_points", "bias")
        if t is not None and t[0] is None:
            y = ops.weight_only.linear_weight_only_direct(x, *t[1:], self.fmt, self.group_size,
                                                          self.in_features, self.backend)
            if y is not None:
                return y
        if self.input_scale is not None:
            x = x * self.input_scale.to(device=x.device, dtype=x.dtype)  # meta inputs too
        return ops.linear_weight_only(x, self.qweight, self.scales, self.zero_points, stored_bias(self),
                                      self.fmt, self.group_size, self.in_features, self.backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes encode. With an input scale this is the weight in the scaled
        domain (W * s per input channel): the layer computes x @ (dequantized_weight() *
        input_scale).T, and that product is the weight in the original domain."""
        return ops.dequantize(self.qweight, self.scales, self.zero_points, self.fmt, self.group_size,
                              self.in_features, dtype)

    def effective_weight(self) -> torch.Tensor:
        """The weight in the original domain: dequantized_weight() * input_scale per input channel."""
        w = self.dequantized_weight()
        return w * self.input_scale[None, :] if self.input_scale is not None else w


def _check_input_scale(input_scale: Optional[torch.Tensor], in_features: int) -> None:
    if input_scale is None:
        return
    if input_scale.shape != (in_features,) or not input_scale.is_floating_point():
        raise ValueError(f"from_codes: input_scale must be a float tensor of shape [{in_features}], got "
                         f"{input_scale.dtype} {tuple(input_scale.shape)}")
    if not bool(torch.isfinite(input_scale).all()):
        raise ValueError("from_codes: input_scale holds NaN or Inf")
