"""Pruning configs: unstructured (Magnitude, RandomPrune) and structured (ChannelPrune).
They share the config base (version, JSON round trip, include / exclude / filter_fn /
skip_output_head) with the quantization configs and are registered beside them."""
from dataclasses import dataclass
from typing import Union

from ..config import Config, register_config

SCOPES = ("layer", "global")
IMPORTANCES = ("l1", "l2", "random", "taylor", "wanda")


def _check_fraction(name: str, field: str, value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: {field} must be in [0, 1), got {value!r}")


@dataclass
class _Unstructured(Config):
    """Individual weights of Linear / Conv layers, pruned to `sparsity` (the fraction of
    zeros). min_layer_sparsity / max_layer_sparsity bound each layer's own sparsity; a
    ceiling below 1 (the default 1 sets none) keeps every layer alive under global ranking."""

    sparsity: float = 0.5
    min_layer_sparsity: float = 0.0
    max_layer_sparsity: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        _check_fraction(name, "sparsity", self.sparsity)
        _check_fraction(name, "min_layer_sparsity", self.min_layer_sparsity)
        if not 0.0 < self.max_layer_sparsity <= 1.0:
            raise ValueError(f"{name}: max_layer_sparsity must be in (0, 1], got {self.max_layer_sparsity!r}")
        if not self.min_layer_sparsity <= self.sparsity <= self.max_layer_sparsity:
            raise ValueError(f"{name}: need min_layer_sparsity <= sparsity <= max_layer_sparsity, got "
                             f"{self.min_layer_sparsity} <= {self.sparsity} <= {self.max_layer_sparsity}")


@register_config
@dataclass
class Magnitude(_Unstructured):
    """Prune the weights of smallest |w|^norm. scope="layer" prunes each layer to `sparsity`;
    scope="global" ranks all selected layers' weights together (one threshold)."""

    scope: str = "layer"
    norm: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ValueError(f"Magnitude: scope must be one of {SCOPES}, got {self.scope!r}")
        if self.norm not in (1, 2):
            raise ValueError(f"Magnitude: norm must be 1 or 2, got {self.norm!r}")


@register_config
@dataclass
class RandomPrune(_Unstructured):
    """Prune a uniformly random `sparsity` fraction of each layer (a baseline); `seed` makes
    it reproducible."""

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_seed("RandomPrune", self.seed)


def _check_seed(who: str, seed: int) -> None:
    if not 0 <= seed < 2 ** 63:  # torch.Generator's range
        raise ValueError(f"{who}: seed must be in [0, 2**63), got {seed!r}")


@register_config
@dataclass
class ChannelPrune(Config):
    """Remove `ratio` of the output channels / filters / FFN neurons / attention heads of each
    prunable group, physically (the layers get smaller). importance: l1 / l2 norm of a
    channel's weights summed over its coupled layers, random, taylor (|w * dL/dw| from
    calib_data / forward_loop), or wanda (Wanda's |W_ij| * ||X_j||_2 summed over the columns
    that read the channel in its consumer layers, X their calibration inputs: structured Wanda,
    "Wanda-sp"; no backward pass). round_to keeps the kept count of channels / neurons a multiple
    of it (heads are whole units). head_ratio: the fraction of attention heads (kv groups under
    GQA) removed, "same" (default) for ratio; 0 keeps every head. compensate (needs calib_data
    / forward_loop): each consumer's bias takes what the removed channels contributed on
    average, W[:, removed] @ mean(x[removed]) over the calibration tokens (FLAP, An et al.
    2024), a linear without a bias gets one; convs are not compensated. Tracing uses the first
    calib_data batch or ts.prune(..., example_inputs=...)."""

    ratio: float = 0.5
    importance: str = "l1"
    round_to: int = 8
    head_ratio: Union[float, str] = "same"  # or a fraction
    seed: int = 0
    compensate: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("ChannelPrune", "ratio", self.ratio)
        if self.importance not in IMPORTANCES:
            raise ValueError(f"ChannelPrune: importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if isinstance(self.head_ratio, str):
            if self.head_ratio != "same":
                raise ValueError(f"ChannelPrune: head_ratio must be a number in [0, 1) or 'same', got {self.head_ratio!r}")
        else:
            _check_fraction("ChannelPrune", "head_ratio", self.head_ratio)
        if self.round_to < 1:
            raise ValueError(f"ChannelPrune: round_to must be >= 1, got {self.round_to}")
        _check_seed("ChannelPrune", self.seed)
