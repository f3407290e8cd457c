"""nn.Conv2d as a sequence of thinner convs: Tucker-2 (1x1, k x k core, 1x1) and CP
(1x1, depthwise kh x 1, depthwise 1 x kw, 1x1). Both keep the surface of the conv they
replace (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, a
read-only reconstructed `.weight`) and save their shapes in the file header."""
from typing import Optional, Tuple

import torch
from torch import nn

from .lowrank_linear import _stats_note, set_factor_bias

_CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "padding_mode")


def conv_geometry(conv: nn.Conv2d) -> dict:
    """What a factorized conv must reproduce of the conv it replaces (JSON-friendly)."""
    g = {f: getattr(conv, f) for f in _CONV_FIELDS}
    for f in ("kernel_size", "stride", "dilation"):
        g[f] = list(g[f])
    if not isinstance(g["padding"], str):
        g["padding"] = list(g["padding"])
    g["bias"] = conv.bias is not None
    return g


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


class _FactorizedConv2d(nn.Module):
    kind = ""
    action = "factorized"
    groups = 1

    def _set_geometry(self, geometry: dict, stats: Optional[dict]) -> None:
        self.geometry = dict(geometry)
        for f in _CONV_FIELDS:
            setattr(self, f, _pair(geometry[f]))
        self.stats = dict(stats or {})

    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        # the bias may have been set or removed since (`layer.bias = ...`): the spec's own holds
        def shape(g):
            return {k: v for k, v in g.items() if k != "bias"}
        return isinstance(mod, nn.Conv2d) and mod.groups == 1 and shape(conv_geometry(mod)) == shape(spec["geometry"])

    def _spec(self, **shape) -> dict:
        # kind / format / in_features / out_features / bias: the keys every saved layer has
        return {"kind": self.kind, "format": self.describe(), "in_features": self.in_channels,
                "out_features": self.out_channels, "bias": self.geometry["bias"],
                "geometry": self.geometry, **shape, "stats": self.stats}

    def dense_bytes(self) -> int:
        kh, kw = self.kernel_size
        return 4 * self.out_channels * (self.in_channels * kh * kw + (1 if self.geometry["bias"] else 0))

    def note(self) -> str:
        return _stats_note(self.stats)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.last.bias

    def __setattr__(self, name, value):
        # the bias lives on the last 1x1 conv; the saved geometries (this layer's, and a
        # quantized last conv's own) say whether there is one
        if name == "bias" and "last" in self._modules:
            if set_factor_bias(self, self.last, value, self.out_channels):
                for holder in (self, self.last):
                    if isinstance(getattr(holder, "geometry", None), dict):
                        holder.geometry["bias"] = value is not None
            return
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name == "bias" and "last" in self._modules:
            self.__setattr__("bias", None)
            return
        super().__delattr__(name)


class TuckerConv2d(_FactorizedConv2d):
    """first: 1x1 (in -> r_in), core: k x k (r_in -> r_out, the original stride / padding /
    dilation / padding mode), last: 1x1 (r_out -> out, the original bias)."""

    kind = "tucker_conv2d"

    def __init__(self, geometry: dict, ranks: Tuple[int, int], stats: Optional[dict] = None, device=None):
        super().__init__()
        self._set_geometry(geometry, stats)
        r_out, r_in = ranks
        self.ranks = (int(r_out), int(r_in))
        self.first = nn.Conv2d(self.in_channels, r_in, 1, bias=False, device=device)
        self.core = nn.Conv2d(r_in, r_out, self.kernel_size, self.stride, self.padding, self.dilation,
                              bias=False, padding_mode=self.padding_mode, device=device)
        self.last = nn.Conv2d(r_out, self.out_channels, 1, bias=geometry["bias"], device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in, kh, kw] kernel the three convs compute."""
        return torch.einsum("rshw,or,si->oihw", self.core.weight, self.last.weight[:, :, 0, 0],
                            self.first.weight[:, :, 0, 0])

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "TuckerConv2d":
        return cls(spec["geometry"], tuple(spec["ranks"]), spec.get("stats"), device=device)

    def spec(self) -> dict:
        return self._spec(ranks=list(self.ranks))

    def describe(self) -> str:
        return f"tucker2 ranks {self.ranks[0]}x{self.ranks[1]}"

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}"


class CPConv2d(_FactorizedConv2d):
    """first: 1x1 (in -> R), vertical: depthwise kh x 1, horizontal: depthwise 1 x kw (the
    original stride / padding / dilation split by axis), last: 1x1 (R -> out, the bias)."""

    kind = "cp_conv2d"

    def __init__(self, geometry: dict, rank: int, stats: Optional[dict] = None, device=None):
        super().__init__()
        self._set_geometry(geometry, stats)
        self.rank = int(rank)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        pad = self.padding
        ph, pw = (pad, pad) if isinstance(pad, str) else pad
        self.first = nn.Conv2d(self.in_channels, rank, 1, bias=False, device=device)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), ph if isinstance(ph, str) else (ph, 0),
                                  (dh, 1), groups=rank, bias=False, device=device)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), (1, sw), pw if isinstance(pw, str) else (0, pw),
                                    (1, dw), groups=rank, bias=False, device=device)
        self.last = nn.Conv2d(rank, self.out_channels, 1, bias=geometry["bias"], device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    @property
    def weight(self) -> torch.Tensor:
        return torch.einsum("or,ri,ry,rx->oiyx", self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0],
                            self.vertical.weight[:, 0, :, 0], self.horizontal.weight[:, 0, 0, :])

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "CPConv2d":
        return cls(spec["geometry"], spec["rank"], spec.get("stats"), device=device)

    def spec(self) -> dict:
        return self._spec(rank=self.rank)

    def describe(self) -> str:
        return f"cp rank {self.rank}"

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}"
