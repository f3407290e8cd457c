"""What every grouped, packed-weight linear shares: its buffers, its saved spec and how it
describes itself.

A subclass sets `kind` and keeps in_features, out_features, fmt, group_size and a bias
buffer (None without bias); its __init__ takes (in, out, fmt, group_size, bias, device=).
"""
import torch

from ..formats import FormatSpec
from .compressed_linear import CompressedLinear


class PackedLinear(CompressedLinear):
    kind = ""

    def _register_packed(self, spec: FormatSpec, in_features: int, out_features: int, groups: int,
                         bias: bool, device=None) -> None:
        """qweight [out, packed in] codes, scales [out, groups] (the format's scale dtype),
        zero_points uint8 [out, groups] for formats with one (else None), bias fp32 [out] or None."""
        self.register_buffer("qweight", torch.zeros(out_features, spec.packed_cols(in_features),
                                                    dtype=spec.code_dtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=spec.scale_dtype, device=device))
        zps = torch.zeros(out_features, groups, dtype=torch.uint8, device=device) if spec.has_zero_point else None
        self.register_buffer("zero_points", zps)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        """An empty module of the shape a saved file describes (see io.load)."""
        return cls(spec["in_features"], spec["out_features"], spec["format"], spec["group_size"],
                   spec["bias"], device=device)

    def spec(self) -> dict:
        return {"kind": self.kind, "format": self.fmt, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def describe(self) -> str:
        """The format as summaries print it, e.g. 'int4 g128', 'int4 g128 (last group 64)' for a
        576-wide layer, or 'fp8_e4m3 per-channel' (also what one group wider than the row is)."""
        g, k = self.group_size, self.in_features
        if g >= k:
            return f"{self.fmt} per-channel"
        return f"{self.fmt} g{g}" + (f" (last group {k % g})" if k % g else "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt}, group_size={self.group_size}, bias={self.bias is not None}")
