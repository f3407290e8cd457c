"""nn.Linear as a product of two thinner linears: y = up(down(x)), W ~ up.weight @ down.weight."""
from typing import Optional

import torch
from torch import nn

from .compute_dtype import held_bias


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _stats_note(stats: dict) -> str:
    """'energy 0.953, rel.err 0.214, FLOPs 590k -> 295k' from a factorized module's stats
    (FLOPs per input row for linears, per output position for convs)."""
    parts = []
    if stats.get("energy") is not None:
        parts.append(f"energy {stats['energy']:.3f}")
    if stats.get("rel_error") is not None:
        parts.append(f"rel.err {stats['rel_error']:.3f}")
    if stats.get("flops_before") is not None:
        parts.append(f"FLOPs {_si(stats['flops_before'])} -> {_si(stats['flops_after'])}")
    return ", ".join(parts)


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """A factor's float weight: nn.Linear's own, or a quantized layer's dequantized one."""
    deq = getattr(linear, "dequantized_weight", None)
    return deq() if callable(deq) else linear.weight


def set_factor_bias(owner: nn.Module, factor: nn.Module, value, out: int) -> bool:
    """`owner.bias = value` for a factorized layer: the bias lives on its last factor, so code
    that resets or replaces a layer's bias (BitFit, re-initialization) reaches it there. value:
    an nn.Parameter of shape [out] or None, as nn.Linear / nn.Conv2d take (a quantized factor
    holds its bias as a buffer, which would take any tensor). False where nothing changed:
    `layer.bias = layer.bias` in a half model hands back the read-only copy of the held bias."""
    name = type(owner).__name__
    source = getattr(value, "_source", None)
    if source is not None and source is held_bias(factor):
        return False
    if value is not None:
        if not isinstance(value, nn.Parameter):
            raise TypeError(f"{name}.bias: expected an nn.Parameter or None, got {type(value).__name__}")
        if tuple(value.shape) != (out,):
            raise ValueError(f"{name}.bias: expected shape ({out},), got {tuple(value.shape)}")
    factor.bias = value
    return True


class LowRankLinear(nn.Module):
    """A rank-r stand-in for nn.Linear(in_features, out_features): down = nn.Linear(in, r,
    bias=False), up = nn.Linear(r, out). Keeps in_features / out_features, a read-only
    reconstructed `.weight` and `.bias` (up's; assigning one sets up's), so code written for
    nn.Linear keeps working; the two factors are ordinary nn.Linear children, so ts.quantize
    finds and quantizes them.

    stats (saved with the model): method, kept energy, relative reconstruction error of the
    weight, and FLOPs per input row before and after.
    """

    kind = "lowrank_linear"
    action = "factorized"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 method: str = "svd", stats: Optional[dict] = None, device=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"LowRankLinear: rank must be in 1..{min(in_features, out_features)}, got {rank}")
        self.in_features, self.out_features, self.rank, self.method = in_features, out_features, rank, method
        self.down = nn.Linear(in_features, rank, bias=False, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device)
        self.stats = dict(stats or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] product of the factors (dequantized if they were quantized)."""
        return _dense_weight(self.up) @ _dense_weight(self.down)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.up.bias

    def __setattr__(self, name, value):
        # nn.Module's __setattr__ registers a Parameter before a property setter could run
        if name == "bias" and "up" in self._modules:
            set_factor_bias(self, self.up, value, self.out_features)
            return
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name == "bias" and "up" in self._modules:  # as `del linear.bias`: no bias after
            set_factor_bias(self, self.up, None, self.out_features)
            return
        super().__delattr__(name)

    @staticmethod
    def dense_flops(in_features: int, out_features: int) -> int:
        return 2 * in_features * out_features

    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        """Whether `mod` is the layer a saved spec was made from (see io.load)."""
        from ..conv1d import linear_shape  # nn.Linear or transformers' Conv1D

        return linear_shape(mod) == (spec["in_features"], spec["out_features"])

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"],
                   spec.get("method", "svd"), spec.get("stats"), device=device)

    def spec(self) -> dict:
        # kind / format / in_features / out_features / bias: the keys every saved layer has
        return {"kind": self.kind, "format": self.describe(), "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank, "bias": self.up.bias is not None,
                "method": self.method, "stats": self.stats}

    def dense_bytes(self) -> int:
        """fp32 bytes of the nn.Linear this replaced."""
        return 4 * self.out_features * (self.in_features + (1 if self.up.bias is not None else 0))

    def describe(self) -> str:
        return f"{self.method} rank {self.rank}"

    def note(self) -> str:
        return _stats_note(self.stats)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"method={self.method}")
