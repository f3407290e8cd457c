"""SparseGPT's column sweep (Frantar & Alistarh, 2023) as a torch.library op over the C++ core
(src/cpu/sparsegpt.cpp, specification in include/tensorslim/sparsegpt.h), with a float64
PyTorch reference of the same algorithm (backend="reference") that the tests compare against.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _views
from .._native import _C
from .calibration import _check_backend, _check_square, _f32


class SparseGptResult(NamedTuple):
    weight: torch.Tensor           # fp32 [rows, cols]: pruned, compensated (on the grid with bits)
    keep: torch.Tensor             # bool [rows, cols]
    scales: Optional[torch.Tensor]  # fp32 [rows] with bits > 0, else None
    damp_used: float
    loss: float


@torch.library.custom_op("tensorslim::sparsegpt_prune", mutates_args=(), device_types="cpu")
def _sparsegpt(w: torch.Tensor, h: torch.Tensor, n: int, m: int, sparsity: float, bits: int,
               block_size: int, damp: float,
               given: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, keep, scales, stats = _sparsegpt_fake(w, h, n, m, sparsity, bits, block_size, damp, given)
    if given is not None:
        scales.copy_(given)  # the grid the sweep rounds to (read by the core)
    damp_used, loss = _C.sparsegpt_prune(_views.view(w, "w"), _views.view(h, "h"), n, m, sparsity, bits,
                                         block_size, damp, _views.view(out, "out"), _views.view(keep, "keep"),
                                         _views.view(scales, "scales"), given is not None)
    stats[0], stats[1] = damp_used, loss
    return out, keep, scales, stats


@_sparsegpt.register_fake
def _sparsegpt_fake(w, h, n, m, sparsity, bits, block_size, damp, given):
    rows, cols = w.shape
    return (torch.empty(rows, cols, dtype=torch.float32, device=w.device),
            torch.empty(rows, cols, dtype=torch.uint8, device=w.device),
            torch.ones(rows, dtype=torch.float32, device=w.device),
            torch.empty(2, dtype=torch.float64, device=w.device))


def _check(w, h, n, m, sparsity, bits, block_size, damp, backend, scales):
    fn = "sparsegpt_prune"
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{fn}: w must be a non-empty 2-D tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{fn}: w must be a float tensor, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{fn}: w contains NaN or Inf")
    _check_square(h, w.shape[1], "h", fn)
    if n or m:
        if not (2 <= m <= 64 and 1 <= n < m):
            raise ValueError(f"{fn}: n:m needs 1 <= n < m <= 64, got {n}:{m}")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{fn}: sparsity must be in [0, 1), got {sparsity}")
    if bits != 0 and not 2 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be 0 (float values) or 2..8, got {bits}")
    if scales is not None:
        if not bits:
            raise ValueError(f"{fn}: scales (the grid to round to) need bits > 0")
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (w.shape[0],):
            raise ValueError(f"{fn}: scales must be a tensor of shape ({w.shape[0]},), got "
                             f"{tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
        if not (torch.isfinite(scales).all() and (scales >= 0).all()):
            raise ValueError(f"{fn}: scales must be finite and >= 0")
    if block_size <= 0:
        raise ValueError(f"{fn}: block_size must be positive, got {block_size}")
    if not (damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"{fn}: damp must be a finite number >= 0, got {damp}")
    _check_backend(backend)


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, n: int = 0, m: int = 0, sparsity: float = 0.5,
                    bits: int = 0, block_size: int = 128, damp: float = 0.01,
                    backend: str = "auto", scales: Optional[torch.Tensor] = None) -> SparseGptResult:
    """Prune `w` [rows, cols] given H = 2/n * sum x x^T [cols, cols]: n:m (n > 0) or unstructured
    to `sparsity`; bits > 0 also quantizes the kept weights (symmetric, per row) in the same sweep,
    on each row's grid `scales` [rows] when given (else max |w| of the row / qmax; 0 means 1)."""
    _check(w, h, n, m, sparsity, bits, block_size, damp, backend, scales)
    if backend == "reference":
        return sparsegpt_reference(w, h, n, m, sparsity, bits, block_size, damp, scales)
    given = None if scales is None else _f32(scales.reshape(-1))
    out, keep, scales, stats = _sparsegpt(_f32(w), _f32(h), n, m, float(sparsity), bits, block_size, float(damp),
                                          given)
    return SparseGptResult(out, keep.bool(), scales if bits else None, float(stats[0]), float(stats[1]))


def _upper_inverse_factor(H: torch.Tensor, damp: float):
    """U with U^T U = (H + frac * mean(diag H) * I)^-1, frac raised x10 until it factors."""
    mean_diag = torch.diag(H).mean()
    frac = damp
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(H + frac * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(0.5 * (Hinv + Hinv.T), upper=True)
            if info == 0:
                return U, frac
        frac = frac * 10 if frac > 0 else 1e-6
    raise ValueError("sparsegpt_prune: H is not positive definite even with damping")


def sparsegpt_reference(w: torch.Tensor, h: torch.Tensor, n: int, m: int, sparsity: float, bits: int,
                        block_size: int = 128, damp: float = 0.01,
                        scales: Optional[torch.Tensor] = None) -> SparseGptResult:
    """The same algorithm, step for step, in float64 PyTorch (the specification)."""
    W = w.detach().double().cpu().clone()
    H = h.detach().double().cpu().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    qmax = 2 ** (bits - 1) - 1 if bits else 0
    scale = None
    if bits:
        scale = (W.abs().amax(1) / qmax).float() if scales is None else scales.detach().float().cpu()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    U, frac = _upper_inverse_factor(H, damp)
    d = torch.diag(U)
    block = -(-block_size // m) * m if m else block_size
    out = torch.zeros(rows, cols, dtype=torch.float64)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    loss = 0.0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        nb = i2 - i1
        err = torch.zeros(rows, nb, dtype=torch.float64)
        if not m:
            score = (W[:, i1:i2] ** 2 / d[i1:i2] ** 2).reshape(-1)
            k = round(sparsity * rows * nb)
            order = torch.argsort(score, stable=True)  # ties: lower flat index first
            bkeep = torch.ones(rows * nb, dtype=torch.bool)
            bkeep[order[:k]] = False
            keep[:, i1:i2] = bkeep.reshape(rows, nb)
        for i in range(i1, i2):
            if m and (i - i1) % m == 0:
                r = min(m, cols - i)
                score = W[:, i:i + r] ** 2 / d[i:i + r] ** 2
                order = torch.argsort(-score, dim=1, stable=True)  # ties keep the lower column
                gk = torch.zeros(rows, r, dtype=torch.bool)
                gk.scatter_(1, order[:, :min(n, r)], True)
                keep[:, i:i + r] = gk
            wv = W[:, i]
            q = torch.where(keep[:, i], wv, torch.zeros_like(wv))
            if bits:
                q = torch.where(keep[:, i], torch.round(wv / scale).clamp(-qmax, qmax) * scale, q)
            out[:, i] = q
            e = (wv - q) / U[i, i]
            loss += float((e * e).sum()) / 2
            W[:, i + 1:i2] -= e[:, None] * U[i, i + 1:i2][None, :]
            err[:, i - i1] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return SparseGptResult(out.float(), keep, scale.float() if bits else None, frac, loss)
