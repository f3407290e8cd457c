"""Low-rank configs: SVD for linear layers, Tucker-2 and CP for 2-D convolutions.

Same layer selection (include / exclude / filter_fn / skip_output_head), versioning and JSON
round trip as every config (see tensorslim.config.Config).
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ..config import Config, check_calibration_fields, register_config

SVD_METHODS = ("svd", "asvd", "svd_llm")
SVD_SOLVERS = ("auto", "exact", "randomized")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_fraction(name: str, field: str, v, closed_top: bool) -> None:
    top = "1]" if closed_top else "1)"
    if v is not None and (not _is_number(v) or not (0.0 < v <= 1.0 if closed_top else 0.0 < v < 1.0)):
        raise ValueError(f"{name}: {field} must be a number in (0, {top}, got {v!r}")


@register_config
@dataclass
class SVD(Config):
    """Truncated SVD of each nn.Linear, W ~ (U sqrt(S)) (sqrt(S) V^T), as two thinner linears.

    Give exactly one of:
      rank:   the same rank for every layer (an int >= 1; a layer with min(in, out) below it is skipped).
      energy: per layer, the smallest rank keeping this fraction of sum(sigma^2), in (0, 1].
      ratio:  per layer, the largest rank whose factors hold at most this fraction of the
              layer's weight parameters, in (0, 1).
      budget: one global budget: the factorized layers together keep this fraction of the
              selected layers' weight parameters, in (0, 1); singular values are dropped where
              they cost least energy (relative to the layer's own) per parameter saved.
    method: "svd" (plain), "asvd" (activation-scaled, Yuan et al. 2023) or "svd_llm"
        (truncation-aware whitening, Wang et al. 2024); the last two need calibration data.
    alpha: ASVD's exponent on mean |x| per input channel. damp: SVD-LLM's damping of X^T X,
        as a fraction of its mean diagonal.
    solver: "exact" (divide-and-conquer SVD), "randomized" (for large layers; needs rank or
        ratio, since energy and budgets need the whole spectrum) or "auto" (randomized when
        the rank is known up front and min(in, out) >= 1024).
    unreached / calibrate_all_experts: with asvd / svd_llm, see
        tensorslim.config.check_calibration_fields (unreached's fallback is plain SVD).
    A layer whose rank would not save parameters is skipped, with the reason in the report.
    """

    rank: Optional[int] = None
    energy: Optional[float] = None
    ratio: Optional[float] = None
    budget: Optional[float] = None
    method: str = "svd"
    alpha: float = 0.5
    damp: float = 0.01
    solver: str = "auto"
    power_iters: int = 2
    oversample: int = 10
    unreached: str = "fallback"
    calibrate_all_experts: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_calibration_fields(self)
        given = [f for f in ("rank", "energy", "ratio", "budget") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"SVD: give exactly one of rank, energy, ratio or budget, got "
                             f"{given or 'none'}")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise ValueError(f"SVD: rank must be an int >= 1, got {self.rank!r}")
        _check_fraction("SVD", "energy", self.energy, closed_top=True)
        _check_fraction("SVD", "ratio", self.ratio, closed_top=False)
        _check_fraction("SVD", "budget", self.budget, closed_top=False)
        if self.method not in SVD_METHODS:
            raise ValueError(f"SVD: method must be one of {SVD_METHODS}, got {self.method!r}")
        if not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SVD: alpha must be a number in [0, 1], got {self.alpha!r}")
        if not _is_number(self.damp) or not 0.0 <= self.damp < 10.0:
            raise ValueError(f"SVD: damp must be a number in [0, 10), got {self.damp!r}")
        if self.solver not in SVD_SOLVERS:
            raise ValueError(f"SVD: solver must be one of {SVD_SOLVERS}, got {self.solver!r}")
        if self.solver == "randomized" and self.rank is None and self.ratio is None:
            raise ValueError("SVD: solver='randomized' needs rank or ratio (energy and budget "
                             "need the whole spectrum)")
        for f in ("power_iters", "oversample"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 0:
                raise ValueError(f"SVD: {f} must be an int >= 0, got {getattr(self, f)!r}")


@register_config
@dataclass
class Tucker(Config):
    """Tucker-2 of each nn.Conv2d over its output- and input-channel modes:
    1x1 conv (in -> r_in), k x k core conv (r_in -> r_out, the layer's stride / padding),
    1x1 conv (r_out -> out). Factors by HOSVD, refined by als_sweeps HOOI sweeps.

    Give exactly one of:
      ranks:  (r_out, r_in), or one int for both (capped at the layer's channels).
      energy: per mode, the smallest rank keeping this fraction of the unfolding's energy.
      ratio:  per layer, the largest ranks (the same fraction of each mode's channels) whose
              three convs cost at most this fraction of the layer's FLOPs, in (0, 1).
    Grouped and depthwise convs are skipped with the reason.
    """

    ranks: Optional[Union[int, Tuple[int, int]]] = None
    energy: Optional[float] = None
    ratio: Optional[float] = None
    als_sweeps: int = 2

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.ranks, list):  # from JSON
            self.ranks = tuple(self.ranks)
        given = [f for f in ("ranks", "energy", "ratio") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"Tucker: give exactly one of ranks, energy or ratio, got {given or 'none'}")
        if self.ranks is not None:
            ok = (_is_int(self.ranks) and self.ranks >= 1) or (
                isinstance(self.ranks, tuple) and len(self.ranks) == 2 and
                all(_is_int(r) and r >= 1 for r in self.ranks))
            if not ok:
                raise ValueError(f"Tucker: ranks must be an int >= 1 or a pair (r_out, r_in) of them, "
                                 f"got {self.ranks!r}")
        _check_fraction("Tucker", "energy", self.energy, closed_top=True)
        _check_fraction("Tucker", "ratio", self.ratio, closed_top=False)
        if not _is_int(self.als_sweeps) or self.als_sweeps < 0:
            raise ValueError(f"Tucker: als_sweeps must be an int >= 0, got {self.als_sweeps!r}")


@register_config
@dataclass
class CP(Config):
    """CP decomposition of each nn.Conv2d kernel with `rank` components, by alternating least
    squares: 1x1 conv (in -> rank), depthwise kh x 1, depthwise 1 x kw, 1x1 conv (rank -> out).
    Grouped / depthwise convs and non-zero padding modes are skipped with the reason."""

    rank: int = 16
    iters: int = 50

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"CP: rank must be an int >= 1, got {self.rank!r}")
        if not _is_int(self.iters) or self.iters < 1:
            raise ValueError(f"CP: iters must be an int >= 1, got {self.iters!r}")
