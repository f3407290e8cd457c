"""Sparsity configs: NM (n of every m weights kept), Unstructured (a fraction kept anywhere)
and SparseStorage (the zeros a model already has, e.g. from ts.prune, stored sparse as they are).
They share the config base (version, JSON round trip, include / exclude / filter_fn /
skip_output_head) with every other family."""
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from ..config import Config, check_calibration_fields, register_config

METHODS = ("magnitude", "wanda", "sparsegpt")
NM_VALUES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
CSR_VALUES = ("auto", "float32", "int8")
LAYOUTS = ("auto", "nm", "csr")
PROFILES = ("uniform", "owl")
STORES = ("sparse", "masks")
BACKENDS = ("auto", "native", "reference")


def _check_common(cfg, values: Tuple[str, ...]) -> None:
    name = type(cfg).__name__
    if cfg.method not in METHODS:
        raise ValueError(f"{name}: method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.values not in values:
        raise ValueError(f"{name}: values must be one of {values}, got {cfg.values!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if not 0.0 <= cfg.damp < 1e6:
        raise ValueError(f"{name}: damp must be >= 0, got {cfg.damp!r}")
    if cfg.block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {cfg.block_size!r}")
    check_calibration_fields(cfg)
    if cfg.store not in STORES:
        raise ValueError(f"{name}: store must be one of {STORES}, got {cfg.store!r}")
    if cfg.bias_correction and cfg.method == "sparsegpt":
        raise ValueError(f"{name}: bias_correction is for magnitude and wanda: SparseGPT's weight update already "
                         f"compensates the pruned weights (MiniLM 50%: 0.934 -> 0.936 with it)")
    if cfg.store == "masks" and cfg.values != "auto":
        raise ValueError(f"{name}: store='masks' keeps each layer's own dense weights for fine-tuning, so values "
                         f"does not apply (got {cfg.values!r}); choose it when storing them sparse afterwards: "
                         f"ts.sparsify(model, ts.SparseStorage(values=...))")


@dataclass(kw_only=True)  # so NM(2, 4) and Unstructured(0.9) read as n, m and sparsity
class _Sparse(Config):
    """What every sparsity config has. method: "magnitude" (|w|, no data), "wanda" (|w| times
    the input's L2 norm per input feature, Sun et al. 2023) or "sparsegpt" (Hessian-based
    pruning with the OBS weight update, Frantar & Alistarh 2023); the last two need
    calib_data / forward_loop. values: how the kept weights are stored ("int8", and "int4"
    for n:m: symmetric per output channel; with sparsegpt the rounding is compensated in the
    same sweep, the paper's joint sparse + quantized mode; "auto":
    the weight's own float dtype where the layout stores it, so a half model stays half:
    n:m keeps float32 / bfloat16 / float16, CSR float32).
    store: "sparse" (sparse modules, frozen) or "masks": the layers stay dense, their pruned
    weights zero and held there while the model trains (ts.prune's masks; SparseGPT's updated
    weights written in), for fine-tuning before ts.sparsify(model, ts.SparseStorage()) stores
    them sparse (sparsity.as_masks).
    bias_correction (magnitude, wanda; needs calib_data): each layer's bias takes what its pruned
    weights contributed on average, (W - W_kept) @ mean(x) over the calibration inputs it sees
    (after the blocks before it were pruned); a layer without a bias gets one.
    damp / block_size: SparseGPT's damping (fraction of mean diag H) and lazy-update block.
    unreached / calibrate_all_experts: with wanda / sparsegpt, see
    tensorslim.config.check_calibration_fields (unreached's fallback is magnitude)."""

    method: str = "magnitude"
    values: str = "auto"
    store: str = "sparse"
    bias_correction: bool = False
    damp: float = 0.01
    block_size: int = 128
    backend: str = "auto"
    unreached: str = "fallback"
    calibrate_all_experts: bool = False
    layout: ClassVar[str] = ""

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude" or self.bias_correction


@register_config
@dataclass
class NM(_Sparse):
    """Keep n of every m consecutive weights along each row's input dimension (2:4, 1:4, 4:8).
    Stored as the kept values plus 2-bit (m = 4) or 3-bit (m = 8) positions. When m does not
    divide in_features, the last partial group of r columns keeps min(n, r) weights."""

    n: int = 2
    m: int = 4
    layout: ClassVar[str] = "nm"

    def __post_init__(self):
        super().__post_init__()
        if self.m not in (4, 8):
            raise ValueError(f"NM: m must be 4 or 8, got {self.m!r}")
        if not 1 <= self.n < self.m:
            raise ValueError(f"NM: n must be in 1..{self.m - 1} (n < m keeps fewer than all), "
                             f"got n={self.n}, m={self.m}")
        _check_common(self, NM_VALUES)

    def describe(self) -> str:
        return f"{self.n}:{self.m} {self.method}"


@register_config
@dataclass
class Unstructured(_Sparse):
    """Prune `sparsity` of each layer's weights anywhere (magnitude: per layer; wanda: per
    output row; sparsegpt: per block of columns), stored as CSR rows (values + 16-bit columns),
    so in_features must be at most 65536.

    profile: "uniform", every layer at `sparsity`; "owl", Outlier Weighed Layerwise sparsity (Yin
    et al., ICML 2024): each block's sparsity set from its share of outlier weights (a Wanda
    score |W_ij| * ||X_j||_2 above owl_m times the block's mean score), blocks with more
    outliers pruned less, within `sparsity` +- 2 * owl_lambda (the paper's +- owl_lambda for
    blocks of equal size) and `sparsity` overall. Needs calibration data with every method
    (sparsity.owl)."""

    sparsity: float = 0.5
    profile: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    layout: ClassVar[str] = "csr"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"Unstructured: sparsity must be in (0, 1), got {self.sparsity!r}")
        _check_common(self, CSR_VALUES)
        if self.profile not in PROFILES:
            raise ValueError(f"Unstructured: profile must be one of {PROFILES}, got {self.profile!r}")
        if not self.owl_m > 0.0:
            raise ValueError(f"Unstructured: owl_m (outlier threshold, times the mean score) must be > 0, "
                             f"got {self.owl_m!r}")
        # a block's sparsity moves up to 2 * owl_lambda from `sparsity`: it must stay in (0, 1)
        most = min(self.sparsity, 1.0 - self.sparsity) / 2
        if self.profile == "owl" and not 0.0 <= self.owl_lambda < most:
            raise ValueError(f"Unstructured: owl_lambda must be in [0, {most:g}) at sparsity {self.sparsity:g} "
                             f"(each block's sparsity moves up to 2 * owl_lambda and must stay in (0, 1)), "
                             f"got {self.owl_lambda!r}")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude" or self.profile == "owl" or self.bias_correction

    def describe(self, sparsity: Optional[float] = None) -> str:
        """`sparsity` (a layer's own, under profile "owl") or the config's, and the method."""
        if sparsity is None:
            return f"{self.sparsity:.0%} {self.method}"
        return f"{sparsity:.1%} {self.method} (owl)"


@register_config
@dataclass
class SparseStorage(Config):
    """Store the zeros the weights already have (a ts.prune mask, or any) sparse, as they are:
    nothing is pruned. layout "auto" takes 2:4 (then 4:8) where every group fits it, else CSR;
    "nm" needs the n:m pattern (n, m) in every group; "csr" always fits. values as NM's and
    Unstructured's ("auto": the weight's own float dtype where the layout stores it)."""

    layout: str = "auto"
    n: int = 2
    m: int = 4
    values: str = "auto"
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.layout not in LAYOUTS:
            raise ValueError(f"SparseStorage: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.m not in (4, 8) or not 1 <= self.n < self.m:
            raise ValueError(f"SparseStorage: need m in (4, 8) and 1 <= n < m, got {self.n}:{self.m}")
        allowed = CSR_VALUES if self.layout == "csr" else NM_VALUES
        if self.values not in allowed:
            raise ValueError(f"SparseStorage: values must be one of {allowed} for layout {self.layout!r}, "
                             f"got {self.values!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SparseStorage: backend must be one of {BACKENDS}, got {self.backend!r}")
