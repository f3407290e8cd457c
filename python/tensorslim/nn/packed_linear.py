"""What every grouped, packed-weight linear shares: its saved spec and how it describes itself.

A subclass sets `kind` and keeps in_features, out_features, fmt, group_size and a bias
buffer (None without bias); its __init__ takes (in, out, fmt, group_size, bias, device=).
"""
from torch import nn


class PackedLinear(nn.Module):
    kind = ""

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
        """The format as summaries print it, e.g. 'int4 g128' or 'fp8_e4m3 per-channel'."""
        group = "per-channel" if self.group_size == self.in_features else f"g{self.group_size}"
        return f"{self.fmt} {group}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt}, group_size={self.group_size}, bias={self.bias is not None}")
