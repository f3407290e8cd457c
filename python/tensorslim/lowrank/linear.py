"""Truncated SVD of nn.Linear layers: plain, ASVD (activation-scaled) and SVD-LLM (whitened).

Each method factorizes a target matrix A = W M (M = I, diag(s), or the Cholesky factor L of
X^T X) and maps the right factor back by M^-1, so W ~ (U_k sqrt(S_k)) (sqrt(S_k) V_k^T M^-1).
Splitting sqrt(S) into both factors keeps their ranges alike, which helps a later quantization.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..nn import LowRankLinear
from .config import SVD
from .rank import Spectrum, rank_for_energy, rank_for_ratio, ranks_for_budget
from ..quantization.calibrate import NEVER_RAN, Reach, settle_unreached
from .stats import collect_input_stats

RANDOMIZED_MIN_DIM = 1024  # solver="auto" sketches layers this large when the rank is known


@dataclass
class Decomposition:
    svd: ops.lowrank.Svd          # of the target A (leading triplets only if randomized)
    spectrum: Spectrum
    col_scale: Optional[torch.Tensor] = None   # ASVD: right factor divided by s per column
    whitener: Optional[torch.Tensor] = None    # SVD-LLM: right factor times L^-1

    @property
    def method(self) -> str:
        return "asvd" if self.col_scale is not None else "svd_llm" if self.whitener is not None else "svd"


def _known_rank(cfg: SVD, rows: int, cols: int) -> Optional[int]:
    if cfg.rank is not None:
        return cfg.rank
    if cfg.ratio is not None:
        return min(rank_for_ratio(rows, cols, cfg.ratio), min(rows, cols))
    return None


def decompose(w: torch.Tensor, cfg: SVD, stats=None) -> Decomposition:
    """The (possibly activation-aware) SVD of one weight [out, in]; without its input `stats`
    (plain SVD, or a layer the calibration never ran under unreached="fallback") plain."""
    w = w.detach().float().cpu()
    col_scale = whitener = None
    if stats is None:
        target = w
    elif cfg.method == "asvd":
        act = stats.mean_abs.float().cpu()
        # Channels that never fire get the smallest non-zero scale instead of a zero divisor.
        floor = act[act > 0].min() if (act > 0).any() else torch.tensor(1.0)
        col_scale = act.clamp(min=float(floor)).pow(cfg.alpha)
        target = w * col_scale[None, :]
    else:
        target, whitener, _ = ops.lowrank.whiten(w, stats.mean_gram.float().cpu(), cfg.damp)
    rows, cols = target.shape
    k = _known_rank(cfg, rows, cols)
    randomized = k is not None and (cfg.solver == "randomized" or (
        cfg.solver == "auto" and min(rows, cols) >= RANDOMIZED_MIN_DIM))
    if randomized:
        svd = ops.lowrank.svd_randomized(target, k, cfg.oversample, cfg.power_iters)
    else:
        svd = ops.lowrank.svd(target)
    total = float(target.double().pow(2).sum())
    return Decomposition(svd, Spectrum(rows, cols, svd.s.double(), total), col_scale, whitener)


def factors(d: Decomposition, rank: int):
    """(up [out, rank], down [rank, in]) with sqrt(S) split between them and M^-1 applied."""
    root = d.svd.s[:rank].clamp(min=0).sqrt()
    up = d.svd.u[:, :rank] * root[None, :]
    down = root[:, None] * d.svd.vt[:rank]
    if d.col_scale is not None:
        down = down / d.col_scale[None, :]
    if d.whitener is not None:
        down = ops.lowrank.unwhiten(down, d.whitener)
    return up, down


def choose_ranks(cfg: SVD, decs: Dict[str, Decomposition]) -> Dict[str, Optional[int]]:
    if cfg.budget is not None:
        return ranks_for_budget({n: d.spectrum for n, d in decs.items()}, cfg.budget)
    out = {}
    for name, d in decs.items():
        sp = d.spectrum
        if cfg.energy is not None:
            out[name] = rank_for_energy(sp, cfg.energy)
        else:
            out[name] = _known_rank(cfg, sp.rows, sp.cols)
    return out


def skip_reason(cfg: SVD, sp: Spectrum, rank: Optional[int]) -> Optional[str]:
    if rank is None:
        return (f"budget {cfg.budget}: kept dense (its spectrum loses more energy per parameter "
                f"saved than the other layers')")
    if rank > sp.max_saving_rank:
        why = f"energy {cfg.energy} needs rank {rank}" if cfg.energy is not None else f"rank {rank}"
        return (f"{why}: its factors would hold {rank * sp.per_rank} parameters, not fewer than "
                f"the dense {sp.dense_params}; factorizing would cost more")
    return None


def plan_linears(model: nn.Module, cfg: SVD, layers: Dict[str, nn.Linear], forward_loop,
                 progress: bool):
    """name -> (skip reason or None, LowRankLinear or None), every module built, none swapped."""
    plans = {}
    if cfg.rank is not None:  # such a layer keeps its weight, as one whose factors would not be smaller
        for name, mod in list(layers.items()):
            k = min(mod.in_features, mod.out_features)
            if cfg.rank > k:
                plans[name] = (f"rank {cfg.rank} is larger than min(in, out) = {k}: nothing to factorize", None)
                del layers[name]
    stats = {}
    if cfg.method != "svd" and layers:
        if forward_loop is None:
            raise ValueError(f"SVD(method={cfg.method!r}) needs calibration data: pass "
                             f"calib_data=[batches...] or forward_loop=fn(model)")
        stats = collect_input_stats(model, layers, forward_loop, with_gram=cfg.method == "svd_llm")
        missed = [n for n in layers if n not in stats]
        settle_unreached(cfg, f"SVD(method={cfg.method!r})", Reach(len(layers), missed))
        if cfg.unreached == "skip":
            for name in missed:
                plans[name] = (NEVER_RAN, None)
                del layers[name]
    # Each layer is built from its decomposition at once, which is then dropped: held for every
    # layer until the end, full U / S / Vt took 1.5x the model's fp32 linears (a whole
    # LLaMA-style model's). A budget compares all spectra first: only what a rank that still
    # saves parameters can use is kept (at most the weight's own size).
    decs = {}
    for name, mod in tqdm(layers.items(), desc="factorizing", disable=not progress or len(layers) < 2,
                          leave=False):
        try:
            d = decompose(mod.weight, cfg, stats.get(name))
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer '{name}' (Linear): {e}") from e
        if cfg.budget is not None:
            decs[name] = _leading(d, d.spectrum.max_saving_rank)
        else:
            plans[name] = _plan(cfg, mod, d, choose_ranks(cfg, {name: d})[name])
    if decs:
        ranks = choose_ranks(cfg, decs)
        for name, d in decs.items():
            plans[name] = _plan(cfg, layers[name], d, ranks[name])
    return plans


def _plan(cfg: SVD, mod: nn.Linear, d: Decomposition, rank: Optional[int]):
    reason = skip_reason(cfg, d.spectrum, rank)
    return reason, None if reason else _build(mod, d, rank, d.method)


def _leading(d: Decomposition, rank: int) -> Decomposition:
    """d with only its leading `rank` singular vectors (copies: the full factors are freed)."""
    u, s, vt = d.svd
    if rank >= s.numel():
        return d
    svd = ops.lowrank.Svd(u[:, :rank].clone(), s[:rank].clone(), vt[:rank].clone())
    return Decomposition(svd, d.spectrum, d.col_scale, d.whitener)


@torch.no_grad()
def _build(mod: nn.Linear, d: Decomposition, rank: int, method: str) -> LowRankLinear:
    up, down = factors(d, rank)
    w = mod.weight.detach().float().cpu()
    norm = float(w.norm())
    err = float((w - up @ down).norm()) / norm if norm > 0 else 0.0
    m, n = mod.out_features, mod.in_features
    stats = {"energy": d.spectrum.kept_energy(rank), "rel_error": err if math.isfinite(err) else None,
             "flops_before": LowRankLinear.dense_flops(n, m), "flops_after": 2 * rank * (m + n)}
    dev, dt = mod.weight.device, mod.weight.dtype
    # normal tensors even under torch.inference_mode (its parameters would fail any later
    # forward with gradients)
    with torch.inference_mode(False), torch.no_grad():
        new = LowRankLinear(n, m, rank, mod.bias is not None, method, stats, device=dev).to(dt)
        new.down.weight.copy_(down.to(dev, dt))
        new.up.weight.copy_(up.to(dev, dt))
        if mod.bias is not None:
            new.up.bias.copy_(mod.bias.detach())
    new.train(mod.training)
    return new
