"""Tucker-2 and CP factorization of nn.Conv2d layers.

Cost is counted per output position: the first 1x1 conv runs at the input resolution, i.e.
stride_h * stride_w times as often as the convs after the stride.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..nn.lowrank_conv import CPConv2d, TuckerConv2d, conv_geometry
from .config import CP, Tucker
from .rank import Spectrum, rank_for_energy


def _sizes(conv: nn.Conv2d):
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    return conv.out_channels, conv.in_channels, kh, kw, sh * sw


def dense_cost(conv: nn.Conv2d) -> Tuple[int, int]:
    """(weight parameters, FLOPs per output position) of the conv itself."""
    O, I, kh, kw, _ = _sizes(conv)
    return O * I * kh * kw, 2 * O * I * kh * kw


def tucker_cost(conv: nn.Conv2d, r_out: int, r_in: int) -> Tuple[int, int]:
    O, I, kh, kw, s = _sizes(conv)
    params = I * r_in + r_in * r_out * kh * kw + r_out * O
    return params, 2 * (I * r_in * s + r_in * r_out * kh * kw + r_out * O)


def cp_cost(conv: nn.Conv2d, rank: int) -> Tuple[int, int]:
    O, I, kh, kw, s = _sizes(conv)
    sw = conv.stride[1]
    return rank * (I + kh + kw + O), 2 * rank * (I * s + kh * sw + kw + O)


def unsupported(conv: nn.Conv2d, cfg) -> Optional[str]:
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return f"{kind} conv (groups={conv.groups}): only dense kernels are factorized"
    if isinstance(cfg, CP) and conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: CP splits the padding across two convs, zeros only"
    return None


def tucker_ranks(name: str, conv: nn.Conv2d, cfg: Tucker) -> Tuple[Tuple[int, int], Optional[float]]:
    """(r_out, r_in) and, for energy, the smaller of the two modes' kept energies."""
    O, I = conv.out_channels, conv.in_channels
    if cfg.ranks is not None:
        if isinstance(cfg.ranks, int):
            return (min(cfg.ranks, O), min(cfg.ranks, I)), None
        r_out, r_in = cfg.ranks
        if r_out > O or r_in > I:
            raise ValueError(f"Tucker: ranks {cfg.ranks} exceed the channels (out={O}, in={I}) of "
                             f"layer '{name}'")
        return (r_out, r_in), None
    if cfg.energy is not None:
        s_out, s_in = ops.lowrank.tucker2_spectra(conv.weight)
        total = float(conv.weight.detach().double().pow(2).sum())
        sp_out = Spectrum(O, I, s_out.double(), total)
        sp_in = Spectrum(I, O, s_in.double(), total)
        r_out, r_in = rank_for_energy(sp_out, cfg.energy), rank_for_energy(sp_in, cfg.energy)
        return (r_out, r_in), min(sp_out.kept_energy(r_out), sp_in.kept_energy(r_in))
    # ratio: the same fraction of each mode's channels, as large as the FLOP ratio allows
    _, flops = dense_cost(conv)
    for r_in in range(I, 0, -1):
        r_out = max(1, round(r_in * O / I))
        if tucker_cost(conv, r_out, r_in)[1] <= cfg.ratio * flops:
            return (r_out, r_in), None
    return (1, 1), None


def _costs_more(cost: Tuple[int, int], dense: Tuple[int, int], what: str) -> Optional[str]:
    if cost[0] >= dense[0] or cost[1] >= dense[1]:
        return (f"{what} would hold {cost[0]} parameters and take {cost[1]} FLOPs per output "
                f"position vs {dense[0]} and {dense[1]} dense; factorizing would cost more")
    return None


@torch.no_grad()
def _fill(new: nn.Module, conv: nn.Conv2d, weights: Dict[str, torch.Tensor]) -> nn.Module:
    dev, dt = conv.weight.device, conv.weight.dtype
    new.to(dev, dt)
    for child, w in weights.items():
        getattr(new, child).weight.copy_(w.to(dev, dt))
    if conv.bias is not None:
        new.last.bias.copy_(conv.bias.detach())
    new.train(conv.training)
    return new


def plan_convs(cfg, layers: Dict[str, nn.Conv2d], progress: bool):
    """name -> (skip reason or None, factorized module or None); nothing swapped yet."""
    plans = {}
    for name, conv in tqdm(layers.items(), desc="factorizing", disable=not progress or len(layers) < 2,
                           leave=False):
        reason = unsupported(conv, cfg)
        if reason:
            plans[name] = (reason, None)
            continue
        try:
            plans[name] = _plan_one(name, conv, cfg)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer '{name}' (Conv2d): {e}") from e
    return plans


def _plan_one(name: str, conv: nn.Conv2d, cfg):
    dense = dense_cost(conv)
    w = conv.weight.detach().float().cpu()
    stats = {"flops_before": dense[1]}
    if isinstance(cfg, Tucker):
        (r_out, r_in), _ = tucker_ranks(name, conv, cfg)
        cost = tucker_cost(conv, r_out, r_in)
        reason = _costs_more(cost, dense, f"Tucker-2 ranks ({r_out}, {r_in})")
        if reason:
            return reason, None
        t = ops.lowrank.tucker2(w, r_out, r_in, cfg.als_sweeps)
        stats.update(energy=max(0.0, 1.0 - t.rel_error ** 2), rel_error=t.rel_error, flops_after=cost[1])
        new = TuckerConv2d(conv_geometry(conv), (r_out, r_in), stats)
        return None, _fill(new, conv, {"first": t.u_in.T[:, :, None, None], "core": t.core,
                                       "last": t.u_out[:, :, None, None]})
    cost = cp_cost(conv, cfg.rank)
    reason = _costs_more(cost, dense, f"CP rank {cfg.rank}")
    if reason:
        return reason, None
    f = ops.lowrank.cp_als(w, cfg.rank, cfg.iters)
    stats.update(energy=None, rel_error=f.rel_error, flops_after=cost[1])
    new = CPConv2d(conv_geometry(conv), cfg.rank, stats)
    return None, _fill(new, conv, {"first": f.b.T[:, :, None, None], "vertical": f.c.T[:, None, :, None],
                                   "horizontal": f.d.T[:, None, None, :], "last": f.a[:, :, None, None]})
