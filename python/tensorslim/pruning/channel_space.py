"""Channel spaces: sets of tensor slices whose channels must be removed together.

A space is one set of channels (conv filters, FFN neurons, attention heads) and every
slice of every module tensor that follows them: the producers' output rows, per-channel
parameters (BatchNorm, depthwise convs), and the consumers' input columns. Spaces joined by
a residual addition are merged (channels added together stay consistent).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from ..conv1d import feature_attrs, feature_dims
from ..transforms import float_weight


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
    width: int = 1   # channels per unit (a GroupNorm's group, removed whole)


class Spaces:
    """Union-find over spaces."""

    def __init__(self):
        self.spaces: List[Space] = []
        self.parent: List[int] = []
        self.untraced: List[str] = []  # weight layers the traced example batch never ran
        self.keep_heads: Dict[str, str] = {}  # attention -> why the trace says its heads stay
        # token folds (autograd_graph.trace) and feature splits (channel_graph) read as keeping
        # channels: where the check then fails, the model is read again without them
        self.guesses = 0

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
        if sa.width != sb.width:  # (the channel graph joins segments of equal reps only)
            sa.unsupported.append(f"{where}: joins units of {sa.width} and {sb.width} channels")
        if sa.size % sa.groups:
            sa.unsupported.append(f"{where}: joins channels grouped in {sa.groups} blocks, which {sa.size} "
                                  f"does not divide")
        self.parent[b] = a
        return a

    def roots(self) -> Dict[int, Space]:
        return {i: self.spaces[i] for i in range(len(self.spaces)) if self.find(i) == i}


def linear_space(sp: Spaces, kind: str, size: int, producers, consumers) -> int:
    """A space of `size` units over linears: producers' output rows and consumers' input
    columns, `rep` consecutive rows / columns per unit. producers, consumers: [(name, module, rep)]."""
    sid = sp.new(size, kind)
    s = sp.get(sid)
    packed = [(name, m) for name, m, _ in [*producers, *consumers] if float_weight(m) is None]
    if packed:  # a quantized or factorized layer has no float weight to slice: left whole
        name, m = packed[0]
        s.frozen.append(f"compressed layer '{name}' ({type(m).__name__}; prune before compressing)")
        s.producers += [name for name, _, _ in producers]  # reported as skipped, with that reason
        return sid
    for name, m, rep in producers:
        s.producers.append(name)
        s.slices.append(Slice(name, "weight", feature_dims(m)[0], 0, rep))
        if m.bias is not None:
            s.slices.append(Slice(name, "bias", 0, 0, rep))
        s.attrs.append((name, feature_attrs(m)[0], rep))
    for name, m, rep in consumers:
        s.slices.append(Slice(name, "weight", feature_dims(m)[1], 0, rep))
        s.attrs.append((name, feature_attrs(m)[1], rep))
    return sid
