"""Calibration cores: GPTQ's column loop and AWQ's scale / clip searches.

Each is a torch.library custom op running the C++ core (src/cpu/gptq.cpp, awq.cpp), with a
plain-PyTorch reference of the same algorithm (backend="reference") that the tests compare
against. Integer grids for b bits: symmetric codes in [-2^(b-1), 2^(b-1) - 1] with
scale = amax / (2^(b-1) - 1); asymmetric codes in [0, 2^b - 1] with scale = (hi - lo) / (2^b - 1)
and a zero point (the format table's conventions, for any width 2..8).
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _views
from .._native import _C
from ..formats import num_groups

_AUTO_BACKENDS = ("auto", "native", "reference")


def int_grid(bits: int, symmetric: bool) -> Tuple[int, int, int]:
    """(qmin, qmax, scale divisor) of a b-bit integer grid."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax - 1, qmax, qmax
    return 0, 2 ** bits - 1, 2 ** bits - 1


def _check_backend(backend: str) -> None:
    if backend not in _AUTO_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_AUTO_BACKENDS}")


def _check_weight(w: torch.Tensor, group_size: int, fn: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{fn}: w must be a non-empty 2-D tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{fn}: w must be a float tensor, got {w.dtype}")
    if group_size <= 0:  # any positive size: the last of ceil(cols / group_size) groups may be short
        raise ValueError(f"{fn}: group_size must be positive, got {group_size}")


def _check_square(m: torch.Tensor, n: int, what: str, fn: str) -> None:
    if m.shape != (n, n):
        raise ValueError(f"{fn}: {what} must be [{n}, {n}] (one row/column per input feature), "
                         f"got {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError(f"{fn}: {what} contains NaN or Inf")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


# ---------------------------------------------------------------- GPTQ


class GptqResult(NamedTuple):
    codes: torch.Tensor        # int32 [rows, cols], original column order
    scales: torch.Tensor       # fp32 [rows, groups]
    zero_points: torch.Tensor  # uint8 [rows, groups] (zeros when symmetric)
    damp_used: float           # damping fraction actually used
    loss: float                # sum of err^2 / Hinv_jj^2 / 2


@torch.library.custom_op("tensorslim::gptq_quantize", mutates_args=(), device_types="cpu")
def _gptq(w: torch.Tensor, h: torch.Tensor, bits: int, symmetric: bool, group_size: int,
          block_size: int, act_order: bool, damp: float
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scales, zps, stats = _gptq_fake(w, h, bits, symmetric, group_size, block_size, act_order, damp)
    damp_used, loss = _C.gptq_quantize(_views.view(w, "w"), _views.view(h, "h"), bits, symmetric,
                                       group_size, block_size, act_order, damp,
                                       _views.view(codes, "codes"), _views.view(scales, "scales"),
                                       _views.view(zps, "zero_points"))
    stats[0], stats[1] = damp_used, loss
    return codes, scales, zps, stats


@_gptq.register_fake
def _gptq_fake(w, h, bits, symmetric, group_size, block_size, act_order, damp):
    rows, cols = w.shape
    groups = num_groups(cols, group_size)
    return (torch.empty(rows, cols, dtype=torch.int32, device=w.device),
            torch.empty(rows, groups, dtype=torch.float32, device=w.device),
            torch.empty(rows, groups, dtype=torch.uint8, device=w.device),
            torch.empty(2, dtype=torch.float64, device=w.device))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 4, symmetric: bool = True,
                  group_size: Optional[int] = 128, block_size: int = 128, act_order: bool = False,
                  damp: float = 0.01, backend: str = "auto") -> GptqResult:
    """GPTQ codes for weight `w` [rows, cols] given H = 2/n * sum x x^T [cols, cols].

    group_size None means one group per row. Damping adds damp * mean(diag H) to the diagonal
    and is raised x10 until the Cholesky factorizations succeed (damp_used tells by how much).
    """
    group = group_size or w.shape[1]
    _check_weight(w, group, "gptq_quantize")
    _check_square(h, w.shape[1], "h", "gptq_quantize")
    int_grid(bits, symmetric)
    _check_backend(backend)
    if block_size <= 0:
        raise ValueError(f"gptq_quantize: block_size must be positive, got {block_size}")
    if not (damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"gptq_quantize: damp must be a finite number >= 0, got {damp}")
    if backend == "reference":
        return gptq_quantize_reference(w, h, bits, symmetric, group, block_size, act_order, damp)
    codes, scales, zps, stats = _gptq(_f32(w), _f32(h), bits, symmetric, group, block_size,
                                      act_order, float(damp))
    return GptqResult(codes, scales, zps, float(stats[0]), float(stats[1]))


def _group_params(v: torch.Tensor, bits: int, symmetric: bool):
    """fp32 scales and zero points of [rows, g] float64 groups (the C++ find_params)."""
    qmin, qmax, div = int_grid(bits, symmetric)
    lo = v.amin(1).clamp(max=0)
    hi = v.amax(1).clamp(min=0)
    span = torch.maximum(-lo, hi) if symmetric else hi - lo
    s = (span / div).float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    zp = torch.zeros_like(lo) if symmetric else torch.round(-lo / s.double()).clamp(qmin, qmax)
    return s, zp


def gptq_quantize_reference(w: torch.Tensor, h: torch.Tensor, bits: int, symmetric: bool,
                            group_size: int, block_size: int = 128, act_order: bool = False,
                            damp: float = 0.01) -> GptqResult:
    """The same algorithm, step for step, in float64 PyTorch (the specification)."""
    qmin, qmax, _ = int_grid(bits, symmetric)
    W = w.detach().double().cpu().clone()
    H = h.detach().double().cpu().clone()
    rows, cols = W.shape
    g = min(group_size, cols)
    groups = num_groups(cols, g)  # slices below stop at cols: the last group may be short
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = (torch.argsort(torch.diag(H), descending=True, stable=True) if act_order
            else torch.arange(cols))
    static = act_order or g == cols
    scales = torch.ones(rows, groups, dtype=torch.float32)
    zps = torch.zeros(rows, groups, dtype=torch.float64)
    if static:
        for k in range(groups):
            scales[:, k], zps[:, k] = _group_params(W[:, k * g:(k + 1) * g], bits, symmetric)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    mean_diag = torch.diag(H).mean()
    frac = damp
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(H + frac * mean_diag * torch.eye(cols, dtype=H.dtype))
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(0.5 * (Hinv + Hinv.T), upper=True)
            if info == 0:
                break
        frac = frac * 10 if frac > 0 else 1e-6
    else:
        raise ValueError("gptq_quantize: H is not positive definite even with damping")
    block = block_size if static else -(-block_size // g) * g
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    loss = 0.0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = torch.zeros(rows, i2 - i1, dtype=torch.float64)
        for i in range(i1, i2):
            orig = int(perm[i])
            k = orig // g
            if not static and i % g == 0:
                scales[:, k], zps[:, k] = _group_params(W[:, i:i + g], bits, symmetric)
            s, z = scales[:, k].double(), zps[:, k]
            c = (torch.round(W[:, i] / s) + z).clamp(qmin, qmax)
            q = (c - z) * s
            codes[:, orig] = c.to(torch.int32)
            e = (W[:, i] - q) / U[i, i]
            loss += float((e * e / 2).sum())
            W[:, i + 1:i2] -= e[:, None] * U[i, i + 1:i2][None, :]
            err[:, i - i1] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return GptqResult(codes, scales, zps.to(torch.uint8), frac, loss)


# ---------------------------------------------------------------- AWQ


def fake_quant_reference(w: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                         ratio=1.0) -> torch.Tensor:
    """fp32 round-to-nearest quantize-dequantize in groups; `ratio` (a number or [rows, groups])
    shrinks each group's range [lo, hi] before the scale is taken (values beyond clamp)."""
    q = quantize_codes_reference(w, bits, symmetric, group_size, ratio)
    return dequantize_codes(*q, group_size)


def quantize_codes_reference(w: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                             ratio=1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int32 codes [rows, cols], fp32 scales [rows, groups], uint8 zero points) of clipped
    round-to-nearest; ratio 1 is exactly the format's round-to-nearest."""
    qmin, qmax, div = int_grid(bits, symmetric)
    rows, cols = w.shape
    g = _grouped(w.float(), group_size)
    ratio = torch.as_tensor(ratio, dtype=torch.float32, device=w.device)
    lo = g.amin(-1).clamp(max=0) * ratio
    hi = g.amax(-1).clamp(min=0) * ratio
    span = torch.maximum(-lo, hi) if symmetric else hi - lo
    scale = span / div
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.zeros_like(scale) if symmetric else torch.round(-lo / scale).clamp(qmin, qmax)
    codes = (torch.round(g / scale[..., None]) + zp[..., None]).clamp(qmin, qmax)
    return codes.reshape(rows, -1)[:, :cols].to(torch.int32), scale, zp.to(torch.uint8)


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, cols] -> [rows, groups, group], a short last group padded with zeros (which
    leave every group's range [min(v, 0), max(v, 0)] as it is)."""
    rows, cols = t.shape
    gs = min(group_size, cols)
    groups = num_groups(cols, gs)
    return F.pad(t, (0, groups * gs - cols)).reshape(rows, groups, gs)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """(codes - zero point) * scale, fp32, for unpacked int32 codes."""
    rows, cols = codes.shape
    c = _grouped(codes, group_size).float()
    z = zero_points.float()[..., None]
    return ((c - z) * scales[..., None]).reshape(rows, -1)[:, :cols]


@torch.library.custom_op("tensorslim::awq_search_scale", mutates_args=(), device_types="cpu")
def _awq_scale(w: torch.Tensor, g: torch.Tensor, act: torch.Tensor, bits: int, symmetric: bool,
               group_size: int, n_grid: int) -> torch.Tensor:
    losses = torch.empty(n_grid, dtype=torch.float32)
    _C.awq_search_scale(_views.view(w, "w"), _views.view(g, "g"), _views.view(act, "act"), bits,
                        symmetric, group_size, n_grid, _views.view(losses, "losses"))
    return losses


@_awq_scale.register_fake
def _awq_scale_fake(w, g, act, bits, symmetric, group_size, n_grid):
    return w.new_empty(n_grid)


def _awq_scales(act: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    s = act.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def awq_scales(act: torch.Tensor, k: int, n_grid: int) -> torch.Tensor:
    """The per-input-channel scale of grid point k: s = act^(k/n), normalized (see awq.h)."""
    alpha = torch.tensor(k, dtype=torch.float32) / torch.tensor(n_grid, dtype=torch.float32)
    return _awq_scales(act.detach().cpu(), alpha)


def awq_search_scale(w: torch.Tensor, g: torch.Tensor, act: torch.Tensor, bits: int = 4,
                     symmetric: bool = True, group_size: int = 128, n_grid: int = 20,
                     backend: str = "auto") -> Tuple[int, torch.Tensor]:
    """(best k, losses [n_grid]): alpha = k / n_grid minimizes the mean output error
    d^T g d of the weight w [rows, cols] scaled by s = act^alpha, quantized, unscaled.
    g = X^T X / n is the Gram matrix of the inputs, act the mean |x| per input channel."""
    _check_weight(w, group_size, "awq_search_scale")
    _check_square(g, w.shape[1], "g", "awq_search_scale")
    if act.shape != (w.shape[1],):
        raise ValueError(f"awq_search_scale: act must have {w.shape[1]} values, got {tuple(act.shape)}")
    int_grid(bits, symmetric)
    _check_backend(backend)
    if n_grid <= 0:
        raise ValueError(f"awq_search_scale: n_grid must be positive, got {n_grid}")
    if backend == "reference":
        losses = awq_search_scale_reference(w, g, act, bits, symmetric, group_size, n_grid)
    else:
        losses = _awq_scale(_f32(w), _f32(g), _f32(act), bits, symmetric, group_size, n_grid)
    return int(torch.argmin(losses)), losses


def awq_search_scale_reference(w, g, act, bits, symmetric, group_size, n_grid) -> torch.Tensor:
    w, g = w.detach().float().cpu(), g.detach().double().cpu()
    losses = torch.empty(n_grid, dtype=torch.float32)
    for k in range(n_grid):
        s = awq_scales(act, k, n_grid)
        d = (w - fake_quant_reference(w * s, bits, symmetric, group_size) / s).double()
        losses[k] = float(torch.einsum("ri,ij,rj->", d, g, d) / w.shape[0])
    return losses


@torch.library.custom_op("tensorslim::awq_search_clip", mutates_args=(), device_types="cpu")
def _awq_clip(w: torch.Tensor, g: torch.Tensor, bits: int, symmetric: bool, group_size: int,
              n_grid: int, max_shrink: float) -> Tuple[torch.Tensor, torch.Tensor]:
    best, losses = _awq_clip_fake(w, g, bits, symmetric, group_size, n_grid, max_shrink)
    _C.awq_search_clip(_views.view(w, "w"), _views.view(g, "g"), bits, symmetric, group_size,
                       n_grid, max_shrink, _views.view(best, "best_ratio"), _views.view(losses, "losses"))
    return best, losses


@_awq_clip.register_fake
def _awq_clip_fake(w, g, bits, symmetric, group_size, n_grid, max_shrink):
    rows, cols = w.shape
    n_ratios = int(math.floor(max_shrink * n_grid + 1e-9))
    groups = num_groups(cols, group_size)
    return (w.new_empty(rows, groups, dtype=torch.float32),
            w.new_empty(rows, groups, n_ratios, dtype=torch.float32))


def clip_ratios(n_grid: int, max_shrink: float) -> torch.Tensor:
    """The candidate ratios 1 - k / n_grid, k < floor(max_shrink * n_grid), as fp32."""
    n = int(math.floor(max_shrink * n_grid + 1e-9))
    return 1.0 - torch.arange(n, dtype=torch.float32) / torch.tensor(n_grid, dtype=torch.float32)


def awq_search_clip(w: torch.Tensor, g: torch.Tensor, bits: int = 4, symmetric: bool = True,
                    group_size: int = 128, n_grid: int = 20, max_shrink: float = 0.5,
                    backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(best ratio [rows, groups], losses [rows, groups, n_ratios]): per group, the range
    shrink that minimizes the group's own output error d_g^T g_gg d_g."""
    _check_weight(w, group_size, "awq_search_clip")
    _check_square(g, w.shape[1], "g", "awq_search_clip")
    int_grid(bits, symmetric)
    _check_backend(backend)
    if not (n_grid > 0 and 0 < max_shrink < 1 and math.floor(max_shrink * n_grid + 1e-9) >= 1):
        raise ValueError(f"awq_search_clip: need n_grid > 0 and 1/n_grid <= max_shrink < 1, "
                         f"got n_grid={n_grid}, max_shrink={max_shrink}")
    if backend == "reference":
        return awq_search_clip_reference(w, g, bits, symmetric, group_size, n_grid, max_shrink)
    return _awq_clip(_f32(w), _f32(g), bits, symmetric, group_size, n_grid, float(max_shrink))


def awq_search_clip_reference(w, g, bits, symmetric, group_size, n_grid, max_shrink):
    w, g = w.detach().float().cpu(), g.detach().double().cpu()
    rows, cols = w.shape
    gs = min(group_size, cols)
    groups = num_groups(cols, gs)
    ratios = clip_ratios(n_grid, max_shrink)
    losses = torch.empty(rows, groups, len(ratios), dtype=torch.float32)
    for i, r in enumerate(ratios):
        d = (w - fake_quant_reference(w, bits, symmetric, group_size, r)).double()
        for k in range(groups):  # the last group may be short: slices stop at cols
            dk = d[:, k * gs:(k + 1) * gs]
            gk = g[k * gs:(k + 1) * gs, k * gs:(k + 1) * gs]
            losses[:, k, i] = torch.einsum("ri,ij,rj->r", dk, gk, dk).float()
    return ratios[losses.argmin(-1)], losses
