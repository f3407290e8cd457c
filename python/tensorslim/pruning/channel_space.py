"""Channel spaces: sets of tensor slices whose channels must be removed together.

A space is one set of channels (conv filters, FFN neurons, attention heads) and every
slice of every module tensor that follows them: the producers' output rows, per-channel
parameters (BatchNorm, depthwise convs), and the consumers' input columns. Spaces joined by
a residual addition are merged (channels added together stay consistent).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass
class Slice:
    module: str
    param: str      # a parameter or buffer name of the module
    dim: int        # the dimension the channels index
    offset: int = 0  # where this space's channels start along dim (concatenations)
    rep: int = 1     # consecutive indices per channel (flattened maps, head dimensions)


@dataclass
class Space:
    size: int
    producers: List[str] = field(default_factory=list)   # layers whose outputs are the channels
    slices: List[Slice] = field(default_factory=list)
    attrs: List[Tuple[str, str, int]] = field(default_factory=list)  # (module, attribute, per channel)
    frozen: List[str] = field(default_factory=list)       # why it must keep every channel
    unsupported: List[str] = field(default_factory=list)  # why it cannot be pruned consistently
    kind: str = "channels"                                 # channels / neurons / heads
    groups: int = 1  # channels form this many equal blocks (a grouped conv's filters): each loses as many


class Spaces:
    """Union-find over spaces."""

    def __init__(self):
        self.spaces: List[Space] = []
        self.parent: List[int] = []
        self.untraced: List[str] = []  # weight layers the traced example batch never ran

    def new(self, size: int, kind: str = "channels") -> int:
        self.spaces.append(Space(size, kind=kind))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> Space:
        return self.spaces[self.find(i)]

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.size != sb.size:
            raise ValueError(f"{where}: adds {sa.size} channels to {sb.size}")
        sa.producers += sb.producers
        sa.slices += sb.slices
        sa.attrs += sb.attrs
        sa.frozen += sb.frozen
        sa.unsupported += sb.unsupported
        sa.groups = math.lcm(sa.groups, sb.groups)
        if sa.size % sa.groups:
            sa.unsupported.append(f"{where}: joins channels grouped in {sa.groups} blocks, which {sa.size} "
                                  f"does not divide")
        self.parent[b] = a
        return a

    def roots(self) -> Dict[int, Space]:
        return {i: self.spaces[i] for i in range(len(self.spaces)) if self.find(i) == i}
