"""The data-free paths: magnitude masks, and storing zeros a model already has."""
from typing import Optional, Tuple

import torch
from torch import nn

from ..pruning.unstructured import _mask_for
from .build import build_layer, dense_linear
from .config import NM, SparseStorage, _Sparse
from .masks import fits_nm, nm_keep


def magnitude_keep(w: torch.Tensor, cfg: _Sparse, sparsity: Optional[float] = None) -> torch.Tensor:
    """n:m: the n largest |w| of each group; unstructured: the layer's round(sparsity * numel)
    smallest |w| pruned (ties in index order, as ts.Magnitude); sparsity: the layer's own (OWL),
    else the config's."""
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; it cannot be ranked or stored sparse")
    if isinstance(cfg, NM):
        return nm_keep(w.detach().abs().cpu(), cfg.n, cfg.m).to(w.device)
    k = round((cfg.sparsity if sparsity is None else sparsity) * w.numel())
    return _mask_for(w.detach().cpu(), k, 1).reshape(w.shape).bool().to(w.device)


def magnitude_layer(name: str, lin: nn.Module, cfg: _Sparse, sparsity: Optional[float] = None
                    ) -> Tuple[nn.Module, str]:
    """The layer pruned by magnitude; sparsity: its own (OWL), else the config's."""
    w, _ = dense_linear(lin)
    layout, n, m = ("nm", cfg.n, cfg.m) if isinstance(cfg, NM) else ("csr", 0, 0)
    mod = build_layer(layout, lin, magnitude_keep(w, cfg, sparsity), cfg.values, cfg.backend, n, m)
    return mod, f"{cfg.describe() if sparsity is None else cfg.describe(sparsity)} {mod.values_dtype}"


def storage_layout(w: torch.Tensor, cfg: SparseStorage) -> Optional[Tuple[str, int, int]]:
    """(layout, n, m) that stores w's zeros as they are, or None when the asked layout cannot."""
    if cfg.layout in ("nm", "auto"):
        candidates = [(cfg.n, cfg.m)] if cfg.layout == "nm" else [(2, 4), (4, 8)]
        for n, m in candidates:
            if fits_nm(w, n, m):
                return "nm", n, m
        if cfg.layout == "nm":
            return None
    return "csr", 0, 0


def storage_layer(name: str, lin: nn.Module, cfg: SparseStorage) -> Tuple[nn.Module, str]:
    w, _ = dense_linear(lin)
    found = storage_layout(w, cfg)
    if found is None:
        raise ValueError(f"its zeros do not follow the {cfg.n}:{cfg.m} pattern (some group of {cfg.m} keeps "
                         f"more than {cfg.n}); use layout='csr' or 'auto'")
    layout, n, m = found
    if layout == "csr" and cfg.values not in ("auto", "float32", "int8"):
        raise ValueError(f"its zeros fit no n:m pattern, and CSR stores float32 or int8 values, not {cfg.values}")
    what = f"{n}:{m}" if layout == "nm" else "csr"
    zeros = float((w == 0).sum()) / max(1, w.numel())
    mod = build_layer(layout, lin, w != 0, cfg.values, cfg.backend, n, m)
    return mod, f"{what} {mod.values_dtype} (as is, {zeros:.1%} zeros)"
