"""Config dataclasses: one per technique, versioned, round-tripping through JSON.

A config is registered with the transform that applies it; `ts.quantize(model, cfg)`
looks the transform up by the config's type.
"""
import collections.abc
import dataclasses
import json
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

CONFIG_VERSION = 1
_CONFIG_TYPES: Dict[str, type] = {}


def register_config(cls):
    _CONFIG_TYPES[cls.__name__] = cls
    return cls


@dataclass(kw_only=True)  # keyword-only, so each config's own fields come first: ts.NM(2, 4)
class LayerFilter:
    """Which layers a transform touches.

    include / exclude: fnmatch patterns on module names (e.g. "encoder.*.attention.*"),
    a list/tuple of them or one pattern as a str (kept as a one-element tuple); an empty
    include means every layer. skip_output_head leaves the model's output head
    (a layer named lm_head / classifier / ..., or one whose weight is tied to an
    embedding) in full precision, as users expect. filter_fn(name, module) -> bool is a
    last, code-only say (not saved to JSON).
    """

    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    skip_output_head: bool = True
    filter_fn: Optional[Callable] = field(default=None, compare=False, repr=False)


class ConfigFieldError(TypeError, ValueError):
    """A config field of the wrong type. Both a TypeError and a ValueError, so code that
    caught either from a config keeps working."""


def _accepts(kind: Any, value: Any) -> Tuple[bool, Any]:
    """(value fits annotation `kind`, value normalized): bools are never numbers, integers
    (numpy's too) are ints, a float field takes ints and floats."""
    if kind is Any:
        return True, value
    origin = typing.get_origin(kind)
    if origin is Union:
        for arm in typing.get_args(kind):
            ok, v = _accepts(arm, value)
            if ok:
                return True, v
        return False, value
    if kind is type(None):
        return value is None, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False, value
        return True, value if isinstance(value, (int, float)) else float(value)  # numpy floats: float
    if kind is str:
        return isinstance(value, str), value
    if kind is Callable or origin is collections.abc.Callable:
        return callable(value), value
    if origin is tuple:  # JSON gives lists back: a list of the right items is the tuple
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(kind)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if args and len(items) != len(value):
            return False, value
        checked = [_accepts(a, v) for a, v in zip(items, value)] if args else [(True, v) for v in value]
        if not all(ok for ok, _ in checked):
            return False, value
        return True, tuple(v for _, v in checked)
    return isinstance(value, origin or kind), value


def _expected(kind: Any) -> str:
    """An annotation as the error message says it: 'int or None', 'a number or str', ..."""
    if typing.get_origin(kind) is Union:
        return " or ".join(_expected(a) for a in typing.get_args(kind))
    if kind is Callable or typing.get_origin(kind) is collections.abc.Callable:
        return "a callable"
    if typing.get_origin(kind) is tuple:
        return "a tuple/list of " + ", ".join(_expected(a) for a in typing.get_args(kind) if a is not Ellipsis)
    names = {bool: "True or False", int: "an int", float: "a number", str: "a str", type(None): "None"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _patterns(cls_name: str, name: str, value: Any) -> Tuple[str, ...]:
    """include / exclude: one fnmatch pattern (a str) or a list / tuple of them."""
    if isinstance(value, str):
        return (value,)  # one pattern, not its characters
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise ConfigFieldError(f"{cls_name}: {name} must be a str pattern or a list/tuple of str patterns, "
                           f"got {value!r}")


def check_field_types(cfg: "Config") -> None:
    """Check (and normalize) every dataclass field of `cfg` against its annotation, so a
    string where a bool belongs ("false" is truthy) or a float group size is an error at
    construction, naming the class, the field, the value and what was expected. Value
    ranges and choices stay with each config's own __post_init__."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("include", "exclude"):
            setattr(cfg, f.name, _patterns(cls.__name__, f.name, value))
            continue
        kind = hints.get(f.name, Any)
        ok, normalized = _accepts(kind, value)
        if not ok:
            raise ConfigFieldError(f"{cls.__name__}: {f.name} must be {_expected(kind)}, got {value!r} "
                                   f"({type(value).__name__})")
        if normalized is not value:
            setattr(cfg, f.name, normalized)


@dataclass(kw_only=True)
class Config(LayerFilter):
    """Base of every technique's config. Every field is type-checked at construction
    (check_field_types); include / exclude take one pattern string or a list of them."""

    version: int = CONFIG_VERSION
    _not_serialized: ClassVar[Tuple[str, ...]] = ("filter_fn",)

    def __post_init__(self):
        check_field_types(self)
        if self.version < 1:
            raise ValueError(f"{type(self).__name__}: config version must be >= 1, got {self.version}")
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

    @classmethod
    def from_dict(cls_, d: dict) -> "Config":
        """The config a to_dict() wrote; called on a config class (Int8WeightOnly.from_dict), the
        dict's type must be that class or a subclass of it."""
        d = dict(d)
        kind = d.pop("type", None)
        cls = _CONFIG_TYPES.get(kind)
        if cls is None:
            raise ValueError(f"unknown config type {kind!r}; known: {sorted(_CONFIG_TYPES)}")
        if not issubclass(cls, cls_):
            raise ValueError(f"{cls_.__name__}.from_dict: the dict holds a {kind}, not a {cls_.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{kind}: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls_, text: str) -> "Config":
        return cls_.from_dict(json.loads(text))


# What becomes of a selected layer the calibration data never runs: see check_calibration_fields.
UNREACHED = ("fallback", "skip", "error")


def check_calibration_fields(cfg: "Config") -> None:
    """The fields every config that calibrates has (ignored without calibration data).

    unreached: a layer the calibration data never runs (a branch not taken, an expert no
    calibration token was routed to) gets the technique's data-free version with "fallback"
    (round to nearest for AWQ / GPTQ, magnitude for Wanda / SparseGPT, per-token activation
    scales for static W8A8, no smoothing for SmoothQuant, plain SVD for ASVD / SVD-LLM), stays
    float with "skip", or makes the call raise a ValueError naming it, the model unchanged, with
    "error". fallback and skip name the layers in a RuntimeWarning and in the Report.
    calibrate_all_experts: True, every expert of a mixture-of-experts block takes every token
    while calibrating (its output still sums only the routed experts'), so each is calibrated on
    all the data's rows, as LLM Compressor does by default; False (the default), each expert on
    the tokens routed to it, the rows it will see, and one no token reached by `unreached`."""
    if cfg.unreached not in UNREACHED:
        raise ValueError(f"{type(cfg).__name__}: unreached must be one of {UNREACHED}, got {cfg.unreached!r}")


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
    """INT8 weights (per output channel by default), float activations. Embedding tables are
    quantized too (see embedding_bits)."""

    group_size: Optional[int] = None
    symmetric: bool = True
    backend: str = "auto"
    embedding_bits: Optional[int] = None
    bits: ClassVar[int] = 8

    def __post_init__(self):
        super().__post_init__()
        _check_common("Int8WeightOnly", self.group_size, self.backend)
        _check_embedding_bits(self)


@register_config
@dataclass
class Int4WeightOnly(Config):
    """INT4 weights in groups along the input dimension (128 by default), float activations.
    Embedding tables are quantized too (see embedding_bits). unreached / calibrate_all_experts:
    with algorithm "awq" / "gptq", see check_calibration_fields."""

    group_size: Optional[int] = 128
    symmetric: bool = True
    algorithm: str = "rtn"
    backend: str = "auto"
    embedding_bits: Optional[int] = None
    unreached: str = "fallback"
    calibrate_all_experts: bool = False
    bits: ClassVar[int] = 4

    def __post_init__(self):
        super().__post_init__()
        _check_common(type(self).__name__, self.group_size, self.backend)
        _check_algorithm(type(self).__name__, self.algorithm)
        _check_embedding_bits(self)
        check_calibration_fields(self)


def _check_embedding_bits(cfg) -> None:
    """embedding_bits: the integer width of nn.Embedding / nn.EmbeddingBag tables (None: 8, per
    row; narrower tables in the config's groups where they divide the embedding width).
    Exclude the tables by name (exclude="*embed*") to keep them float."""
    if cfg.embedding_bits is None:
        return
    from .formats import integer_format  # the table lives in the native core

    try:
        integer_format(cfg.embedding_bits, cfg.symmetric)
    except ValueError as e:
        raise ValueError(f"{type(cfg).__name__}: embedding_bits: {e}") from None


def _check_algorithm(name: str, algorithm: str) -> None:
    if algorithm not in WEIGHT_ONLY_ALGORITHMS:
        raise ValueError(f"{name}: algorithm {algorithm!r} is not available; supported: "
                         f"{sorted(WEIGHT_ONLY_ALGORITHMS)}")


@register_config
@dataclass
class IntWeightOnly(Config):
    """N-bit integer weights (2..8 bits, as the format table provides) in groups along the
    input dimension, float activations. Int8WeightOnly / Int4WeightOnly are the common cases.
    Embedding tables are quantized too (see embedding_bits). unreached / calibrate_all_experts:
    with algorithm "awq" / "gptq", see check_calibration_fields."""

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = True
    algorithm: str = "rtn"
    backend: str = "auto"
    embedding_bits: Optional[int] = None
    unreached: str = "fallback"
    calibrate_all_experts: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_common("IntWeightOnly", self.group_size, self.backend)
        _check_algorithm("IntWeightOnly", self.algorithm)
        _check_embedding_bits(self)
        check_calibration_fields(self)
        from .formats import integer_format  # the table lives in the native core

        try:
            integer_format(self.bits, self.symmetric)
        except ValueError as e:
            raise ValueError(f"IntWeightOnly: {e}") from None


@register_config
@dataclass
class Binary(Config):
    """1-bit weights: sign(w) x mean |w| per output channel (XNOR-Net), bit-packed.
    activations=True binarizes the activations too (per row, sign x mean |x|) and runs the
    XNOR/popcount kernel. Skips the output head by default, like every config."""

    activations: bool = False
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in ("auto", "native", "reference"):
            raise ValueError(f"Binary: backend must be auto, native or reference, got {self.backend!r}")


@register_config
@dataclass
class Ternary(Config):
    """Ternary weights {-1, 0, +1} x one scale per output channel (TWN thresholds), 2 bits each."""

    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in ("auto", "native", "reference"):
            raise ValueError(f"Ternary: backend must be auto, native or reference, got {self.backend!r}")


PRESETS: Dict[str, Callable[[], Config]] = {
    "int8": Int8WeightOnly,
    "int8_weight_only": Int8WeightOnly,
    "w8a16": Int8WeightOnly,
    "int4": Int4WeightOnly,
    "int4_weight_only": Int4WeightOnly,
    "w4a16": Int4WeightOnly,
    "binary": Binary,
    "ternary": Ternary,
    "xnor": lambda: Binary(activations=True),
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


# ---------------------------------------------------------------- low-bit float weights

_LOWBIT_BACKENDS = ("auto", "native", "scalar", "reference")


def _check_lowbit_backend(name: str, backend: str) -> None:
    if backend not in _LOWBIT_BACKENDS:
        raise ValueError(f"{name}: backend must be one of {_LOWBIT_BACKENDS}, got {backend!r}")


@register_config
@dataclass
class FP8WeightOnly(Config):
    """FP8 weights (E4M3 or E5M2) with an fp32 scale per output channel (group_size None)
    or per group, chosen so each group's max maps to the format's max; float activations."""

    fmt: str = "e4m3"
    group_size: Optional[int] = None
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.fmt not in ("e4m3", "e5m2"):
            raise ValueError(f"FP8WeightOnly: fmt must be 'e4m3' or 'e5m2', got {self.fmt!r}")
        if self.group_size is not None and self.group_size not in _GROUP_SIZES:
            raise ValueError(f"FP8WeightOnly: group_size must be None (per channel) or one of "
                             f"{_GROUP_SIZES}, got {self.group_size}")
        _check_lowbit_backend("FP8WeightOnly", self.backend)

    @property
    def format_name(self) -> str:
        return f"fp8_{self.fmt}"


@dataclass
class _BlockFP4(Config):
    """E2M1 weights in fixed blocks with a per-block scale (the format table fixes both)."""

    backend: str = "auto"
    format_name: ClassVar[str] = ""
    group_size: ClassVar[int] = 0

    def __post_init__(self):
        super().__post_init__()
        _check_lowbit_backend(type(self).__name__, self.backend)


@register_config
@dataclass
class NVFP4(_BlockFP4):
    """NVFP4 weights: E2M1 in blocks of 16 with an E4M3 block scale and one fp32 tensor scale."""

    format_name: ClassVar[str] = "nvfp4"
    group_size: ClassVar[int] = 16


@register_config
@dataclass
class MXFP4(_BlockFP4):
    """MXFP4 weights (OCP MX v1.0): E2M1 in blocks of 32 with an E8M0 power-of-two scale."""

    format_name: ClassVar[str] = "mxfp4"
    group_size: ClassVar[int] = 32


PRESETS.update({
    "fp8": FP8WeightOnly,
    "fp8_e4m3": FP8WeightOnly,
    "fp8_e5m2": lambda: FP8WeightOnly(fmt="e5m2"),
    "nvfp4": NVFP4,
    "mxfp4": MXFP4,
})


_OBSERVER_METHODS = ("max", "percentile", "mse", "kl")
_INT8_BACKENDS = ("auto", "onednn", "reference")


def _check_smoothquant(name: str, cfg: "_Int8Activations") -> None:
    a = cfg.smoothquant_alpha
    if isinstance(a, str):
        if a != "auto":
            raise ValueError(f"{name}: smoothquant_alpha must be a number in [0, 1] or 'auto', got {a!r}")
    elif isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"{name}: smoothquant_alpha must be a number in [0, 1] or 'auto', got {a!r}")
    step = cfg.alpha_grid_step
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 0.5 or \
            abs(1 / step - round(1 / step)) > 1e-6:
        raise ValueError(f"{name}: alpha_grid_step must divide 1 (e.g. 0.05, 0.1, 0.25), got {step!r}")
    if not isinstance(cfg.search_rows, int) or cfg.search_rows < 16:
        raise ValueError(f"{name}: search_rows must be an int >= 16, got {cfg.search_rows!r}")
    if cfg.backend not in _INT8_BACKENDS:
        raise ValueError(f"{name}: backend must be one of {_INT8_BACKENDS}, got {cfg.backend!r}")


def check_weight_qmax(q, who: str) -> None:
    """The INT8 weight code bound's rule (configs and Int8Linear.from_float alike)."""
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 127:
        raise ValueError(f"{who}: weight_qmax must be an int in [1, 127], got {q!r}")


@dataclass
class _Int8Activations(Config):
    """What W8A8 and Int8Dynamic share: INT8 weights per output channel, INT8 activations,
    and optional SmoothQuant.

    smoothquant_alpha: migration strength in [0, 1], or "auto" for a per-layer grid search
        (steps of alpha_grid_step, on up to search_rows sampled calibration rows per layer).
    fold: fold smoothing into the preceding norm / linear layer where that is exact.
    weight_qmax: the largest linear weight code (symmetric per output channel), in [1, 127].
        64 keeps every pair of u8 x s8 products inside the int16 in which CPUs without VNNI
        (AVX2) sum them, so oneDNN's INT8 matmul is exact there and runs the product (MiniLM's
        linears at batch 32: 1.7-1.9x fp32 instead of 1.1-1.3x) for a little accuracy
        (docs/w8a8.md). None (the default) picks per layer on this CPU: 64 where only such
        weights make that matmul exact (no VNNI / AMX, torch's oneDNN ops present), else 127,
        as torch.ao's x86 defaults narrow the range on CPUs without VNNI. Pass 127 for the same
        codes on every machine. Convolutions keep 127: on such CPUs their activations go 7-bit
        instead, which measured better there (docs/conv.md).
    unreached / calibrate_all_experts: see check_calibration_fields.
    """

    smoothquant: bool = True
    smoothquant_alpha: Union[float, str] = 0.5  # or "auto"
    fold: bool = True
    search_rows: int = 512
    alpha_grid_step: float = 0.05
    backend: str = "auto"
    weight_qmax: Optional[int] = None
    unreached: str = "fallback"
    calibrate_all_experts: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_smoothquant(type(self).__name__, self)
        check_calibration_fields(self)
        if self.weight_qmax is not None:
            check_weight_qmax(self.weight_qmax, type(self).__name__)


@register_config
@dataclass
class W8A8(_Int8Activations):
    """INT8 activations with calibrated (static) scales, optionally smoothed with SmoothQuant.
    Needs calibration data.

    observer: how the static activation range is chosen: max, percentile, mse or kl.
    act_symmetric: int8 activations with zero point 0 instead of uint8 with a zero point.
    """

    observer: str = "max"
    percentile: float = 99.99
    act_symmetric: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.observer not in _OBSERVER_METHODS:
            raise ValueError(f"W8A8: observer must be one of {_OBSERVER_METHODS}, got {self.observer!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"W8A8: percentile must be in (0, 100], got {self.percentile}")


@register_config
@dataclass
class Int8Dynamic(_Int8Activations):
    """Activations quantized per token at run time (as torch.ao's dynamic quantization).
    No calibration unless smoothquant=True."""

    smoothquant: bool = False


PRESETS.update({
    "w8a8": W8A8,
    "w8a8_smoothquant": W8A8,
    "int8_dynamic": Int8Dynamic,
})


@register_config
@dataclass
class W4A8(Config):
    """INT4 weights in groups along the input dimension (128 by default; None = per output
    channel), symmetric int4 or asymmetric uint4, times INT8 activations quantized per token
    at run time; the product runs on integer dot products (AVX-512 VNNI). No calibration.

    backend: auto (native where it fits), native, scalar (the C++ reference) or reference
    (plain PyTorch)."""

    group_size: Optional[int] = 128
    symmetric: bool = True
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.group_size is not None and self.group_size not in _GROUP_SIZES:
            raise ValueError(f"W4A8: group_size must be None (per channel) or one of {_GROUP_SIZES}, "
                             f"got {self.group_size!r}")
        if self.backend not in ("auto", "native", "scalar", "reference"):
            raise ValueError(f"W4A8: backend must be auto, native, scalar or reference, got {self.backend!r}")

    @property
    def format_name(self) -> str:
        return "int4" if self.symmetric else "uint4"


PRESETS.update({
    "w4a8": W4A8,
    "int4_int8": W4A8,
})


GPTQ_MAX_BLOCK_SIZE = 1 << 16


@register_config
@dataclass
class GPTQ(IntWeightOnly):
    """IntWeightOnly(algorithm="gptq") with GPTQ's own settings: act_order visits columns by
    decreasing Hessian diagonal; damp is the fraction of mean(diag H) added to H's diagonal
    (raised automatically, with a warning, if H is still singular); block_size is the
    lazy-update block. fit_float_outputs fits each layer to the float model's outputs from the
    quantized model's inputs (asymmetric calibration, as in GPTAQ), so it also undoes the error
    earlier quantized layers left in its input; it quantizes one layer group at a time and keeps a
    float copy of the block being calibrated. Needs calibration data."""

    algorithm: str = "gptq"
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    fit_float_outputs: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm != "gptq":
            raise ValueError(f"GPTQ: algorithm must be 'gptq', got {self.algorithm!r}")
        if not (0.0 <= float(self.damp) < 10.0):
            raise ValueError(f"GPTQ: damp must be in [0, 10), got {self.damp}")
        if not 0 < self.block_size <= GPTQ_MAX_BLOCK_SIZE:  # a huge block would only fail allocating
            raise ValueError(f"GPTQ: block_size must be in [1, {GPTQ_MAX_BLOCK_SIZE}], got {self.block_size}")


@register_config
@dataclass
class AWQ(IntWeightOnly):
    """IntWeightOnly(algorithm="awq") with AWQ's search settings: n_grid scale exponents
    alpha = k / n_grid, and clip ratios 1 - k / n_grid down to 1 - max_shrink. Needs
    calibration data."""

    algorithm: str = "awq"
    n_grid: int = 20
    max_shrink: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm != "awq":
            raise ValueError(f"AWQ: algorithm must be 'awq', got {self.algorithm!r}")
        if int(self.n_grid) <= 0:
            raise ValueError(f"AWQ: n_grid must be positive, got {self.n_grid}")
        if not (0.0 < float(self.max_shrink) < 1.0 and self.max_shrink * self.n_grid >= 1):
            raise ValueError(f"AWQ: max_shrink must be in [1/n_grid, 1), got {self.max_shrink}")
