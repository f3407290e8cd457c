"""Config dataclasses: one per technique, versioned, round-tripping through JSON.

A config is registered with the transform that applies it; `ts.quantize(model, cfg)`
looks the transform up by the config's type.
"""
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Optional, Tuple

CONFIG_VERSION = 1
_CONFIG_TYPES: Dict[str, type] = {}


def register_config(cls):
    _CONFIG_TYPES[cls.__name__] = cls
    return cls


@dataclass
class LayerFilter:
    """Which layers a transform touches.

    include / exclude: fnmatch patterns on module names (e.g. "encoder.*.attention.*");
    an empty include means every layer. skip_output_head leaves the model's output head
    (a layer named lm_head / classifier / ..., or one whose weight is tied to an
    embedding) in full precision, as users expect. filter_fn(name, module) -> bool is a
    last, code-only say (not saved to JSON).
    """

    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    skip_output_head: bool = True
    filter_fn: Optional[Callable] = field(default=None, compare=False, repr=False)


@dataclass
class Config(LayerFilter):
    version: int = CONFIG_VERSION
    _not_serialized: ClassVar[Tuple[str, ...]] = ("filter_fn",)

    def __post_init__(self):
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        if self.version > CONFIG_VERSION:
            raise ValueError(f"{type(self).__name__}: config version {self.version} is newer than "
                             f"this tensorslim understands ({CONFIG_VERSION})")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in self._not_serialized}
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return {"type": type(self).__name__, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        d = dict(d)
        kind = d.pop("type", None)
        cls = _CONFIG_TYPES.get(kind)
        if cls is None:
            raise ValueError(f"unknown config type {kind!r}; known: {sorted(_CONFIG_TYPES)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{kind}: unknown fields {sorted(unknown)}")
        return cls(**d)

    @staticmethod
    def from_json(text: str) -> "Config":
        return Config.from_dict(json.loads(text))


_GROUP_SIZES = (32, 64, 128, 256)
# Weight-only rounding algorithms; calibrating ones (awq, gptq) register themselves on import.
WEIGHT_ONLY_ALGORITHMS = {"rtn": "round to nearest"}
_BACKENDS = ("auto", "native", "onednn", "reference")


def _check_common(name: str, group_size: Optional[int], backend: str) -> None:
    if group_size is not None and group_size not in _GROUP_SIZES:
        raise ValueError(f"{name}: group_size must be None (per channel) or one of {_GROUP_SIZES}, "
                         f"got {group_size}")
    if backend not in _BACKENDS:
        raise ValueError(f"{name}: backend must be one of {_BACKENDS}, got {backend!r}")


@register_config
@dataclass
class Int8WeightOnly(Config):
    """INT8 weights (per output channel by default), float activations."""

    group_size: Optional[int] = None
    symmetric: bool = True
    backend: str = "auto"
    bits: ClassVar[int] = 8

    def __post_init__(self):
        super().__post_init__()
        _check_common("Int8WeightOnly", self.group_size, self.backend)


@register_config
@dataclass
class Int4WeightOnly(Config):
    """INT4 weights in groups along the input dimension (128 by default), float activations."""

    group_size: Optional[int] = 128
    symmetric: bool = True
    algorithm: str = "rtn"
    backend: str = "auto"
    bits: ClassVar[int] = 4

    def __post_init__(self):
        super().__post_init__()
        _check_common(type(self).__name__, self.group_size, self.backend)
        _check_algorithm(type(self).__name__, self.algorithm)


def _check_algorithm(name: str, algorithm: str) -> None:
    if algorithm not in WEIGHT_ONLY_ALGORITHMS:
        raise ValueError(f"{name}: algorithm {algorithm!r} is not available; supported: "
                         f"{sorted(WEIGHT_ONLY_ALGORITHMS)}")


@register_config
@dataclass
class IntWeightOnly(Config):
    """N-bit integer weights (2..8 bits, as the format table provides) in groups along the
    input dimension, float activations. Int8WeightOnly / Int4WeightOnly are the common cases."""

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = True
    algorithm: str = "rtn"
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        _check_common("IntWeightOnly", self.group_size, self.backend)
        _check_algorithm("IntWeightOnly", self.algorithm)
        from .formats import integer_format  # the table lives in the native core

        try:
            integer_format(self.bits, self.symmetric)
        except ValueError as e:
            raise ValueError(f"IntWeightOnly: {e}") from None


PRESETS: Dict[str, Callable[[], Config]] = {
    "int8": Int8WeightOnly,
    "int8_weight_only": Int8WeightOnly,
    "w8a16": Int8WeightOnly,
    "int4": Int4WeightOnly,
    "int4_weight_only": Int4WeightOnly,
    "w4a16": Int4WeightOnly,
}


def resolve_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        make = PRESETS.get(config.lower())
        if make is None:
            raise ValueError(f"unknown preset {config!r}; presets: {sorted(PRESETS)}")
        return make()
    raise TypeError(f"expected a tensorslim config or a preset name, got {type(config).__name__}")
