"""nn.Linear with binary (1 bit) or ternary (2 bit) weights and one fp32 scale per row."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from .compressed_linear import CompressedLinear
from .compute_dtype import stored_bias


class _PackedSignLinear(CompressedLinear):
    """Shared buffers: qweight uint8 [out, ceil(in / per_byte)], scales fp32 [out], bias."""

    kind = ""
    per_byte = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str = "auto",
                 device=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"{type(self).__name__}: in_features and out_features must be positive, "
                             f"got {in_features}, {out_features}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        cols = (in_features + self.per_byte - 1) // self.per_byte
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def _load(self, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        if tuple(qweight.shape) != tuple(self.qweight.shape) or tuple(scales.shape) != (self.out_features,):
            raise ValueError(f"{type(self).__name__}: expected qweight {tuple(self.qweight.shape)} and scales "
                             f"({self.out_features},), got {tuple(qweight.shape)} and {tuple(scales.shape)}")
        with torch.no_grad():
            self.qweight.copy_(qweight)
            self.scales.copy_(scales)
            if bias is not None:
                self.bias.copy_(bias.detach().float())

    def spec(self) -> dict:
        return {"kind": self.kind, "format": self.format_name, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format_name}, bias={self.bias is not None}")


class BinaryLinear(_PackedSignLinear):
    """y = x @ (sign(w) * scale).T + bias, 1 bit per weight.

    binarize_activations=True runs XNOR-Net instead: x is binarized per row too (signs
    and mean |x|) and the dot products are XNOR + popcount.
    """

    kind = "binary_linear"
    per_byte = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 binarize_activations: bool = False, backend: str = "auto", device=None):
        super().__init__(in_features, out_features, bias, backend, device)
        self.binarize_activations = bool(binarize_activations)

    @property
    def format_name(self) -> str:
        return "xnor" if self.binarize_activations else "binary"

    @classmethod
    def from_linear(cls, linear: nn.Linear, binarize_activations: bool = False,
                    backend: str = "auto") -> "BinaryLinear":
        bits, scales = ops.binarize(linear.weight.detach())
        return cls.from_packed(bits, scales, linear.bias, linear.in_features, binarize_activations, backend)

    @classmethod
    def from_packed(cls, bits: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                    in_features: int, binarize_activations: bool = False,
                    backend: str = "auto") -> "BinaryLinear":
        mod = cls(in_features, bits.shape[0], bias is not None, binarize_activations, backend, device=bits.device)
        mod._load(bits, scales, bias)
        return mod

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "BinaryLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"],
                   binarize_activations=spec["format"] == "xnor", device=device)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = ops.xnor_linear if self.binarize_activations else ops.binary_linear
        return fn(x, self.qweight, self.scales, stored_bias(self), self.in_features, self.backend)

    def dequantized_weight(self) -> torch.Tensor:
        return ops.unpack_signs(self.qweight, self.in_features) * self.scales[:, None]

    def describe(self) -> str:
        return "binary w1a1 (xnor)" if self.binarize_activations else "binary w1 per-channel"


class TernaryLinear(_PackedSignLinear):
    """y = x @ (t * scale).T + bias with t in {-1, 0, +1}, 2 bits per weight."""

    kind = "ternary_linear"
    per_byte = 4
    format_name = "ternary"

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> "TernaryLinear":
        codes, scales = ops.ternarize(linear.weight.detach())
        return cls.from_packed(codes, scales, linear.bias, linear.in_features, backend)

    @classmethod
    def from_packed(cls, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                    in_features: int, backend: str = "auto") -> "TernaryLinear":
        mod = cls(in_features, codes.shape[0], bias is not None, backend, device=codes.device)
        mod._load(codes, scales, bias)
        return mod

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "TernaryLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], device=device)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.ternary_linear(x, self.qweight, self.scales, stored_bias(self), self.in_features,
                                  self.backend)

    def dequantized_weight(self) -> torch.Tensor:
        return ops.unpack_trits(self.qweight, self.in_features) * self.scales[:, None]

    def describe(self) -> str:
        return "ternary w2 per-channel"
