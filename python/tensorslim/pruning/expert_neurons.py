"""ts.ChannelPrune on transformers' fused mixture-of-experts weights (nn/expert_linears.py).

Each expert's intermediate neurons are its own: neuron i of expert e is gate row i and up row
I + i of `gate_up_proj[e]` (rows 2i and 2i + 1 where gate and up are interleaved, as in
GPT-OSS; row i of `up_proj[e]` without a gate), with their biases, and column i of
`down_proj[e]`. Every expert loses the same number (its own lowest by
importance), so the fused tensors stay fused, [experts, 2 x kept, hidden] and [experts,
hidden, kept] (transposed layouts alike), and the module's forward runs as before. Removing a
neuron equals zeroing it (its up / gate rows give 0, or its down column reads nothing); each
pruned module is checked so against its zeroed original on a random routing, and put back
where it is not.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn.expert_linears import ExpertLinears, _shape, intermediate_attr
from ..ops import prune as prune_ops
from ..report import LayerChange, module_bytes
from ..transforms import filter_reason


def fused_experts(model: nn.Module) -> Dict[str, nn.Module]:
    """{name: fused experts module} of the modules ExpertLinears describes."""
    return {n: m for n, m in model.named_modules() if n and ExpertLinears.why_not(m) is None}


def _params(m: nn.Module) -> Tuple[str, str]:
    """(the first projection's parameter, its bias's name)."""
    return ("gate_up_proj" if m.has_gate else "up_proj"), ("gate_up_proj_bias" if m.has_gate else "up_proj_bias")


def _dims(m: nn.Module) -> Tuple[int, int]:
    """The dims of the first projection and of down_proj that index the neurons."""
    return (2, 1) if m.is_transposed else (1, 2)


def selected(experts: Dict[str, nn.Module], cfg) -> Tuple[Dict[str, Tuple[nn.Module, int, int]], List[LayerChange]]:
    """({name: (module, neurons per expert, kept per expert)} of the experts cfg prunes, rows of
    those it leaves). A ValueError naming the layer where a ratio would leave none (raised
    before anything changes: the caller asks first)."""
    chosen, rows = {}, []
    for name, m in experts.items():
        reason = filter_reason(name, m, cfg, set())
        if reason is not None:
            rows.append(LayerChange(name, type(m).__name__, "skipped", bytes_before=module_bytes(m), reason=reason))
            continue
        inter = _shape(m.down_proj, m.is_transposed)[2]
        keep = round(inter * (1.0 - cfg.ratio))
        if keep == 0:
            raise ValueError(f"layer '{name}': ratio {cfg.ratio} leaves 0 of an expert's {inter} neurons; "
                             f"use a smaller one")
        kept = min(inter, math.ceil(keep / cfg.round_to) * cfg.round_to)
        if kept < inter:
            chosen[name] = (m, inter, kept)
    return chosen, rows


def _first_rows(m: nn.Module, inter: int) -> torch.Tensor:
    """[rows per neuron, inter]: where neuron i's rows sit along the first projection's neuron dim."""
    i = torch.arange(inter)
    if not m.has_gate:
        return i[None]
    return torch.stack([i, i + inter]) if m.is_concatenated else torch.stack([2 * i, 2 * i + 1])


def _neuron_rows(m: nn.Module, inter: int) -> List[Tuple[str, int, torch.Tensor]]:
    """(parameter name, dim, positions [inter]): where each neuron's weights sit along `dim`."""
    first, _ = _params(m)
    d1, d2 = _dims(m)
    return [(first, d1, rows) for rows in _first_rows(m, inter)] + [("down_proj", d2, torch.arange(inter))]


def _mask(gone: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """[experts, size] bool: True at each expert's gone neurons' positions (positions [inter])."""
    return torch.zeros(gone.shape[0], size, dtype=torch.bool).scatter_(1, positions.expand_as(gone), gone)


def _scores(m: nn.Module, name: str, inter: int, cfg, grads: Optional[Dict[str, torch.Tensor]], seed: int
            ) -> Tuple[torch.Tensor, int]:
    """([experts, inter] float64 importance, how many experts no gradient reached): the l1 / l2
    norms of each neuron's weights (taylor: of w * dL/dw; an expert no calibration token was
    routed to has no gradient, and its neurons are ranked by l1 instead), or random."""
    experts = m.down_proj.shape[0]
    if cfg.importance == "random":
        g = torch.Generator().manual_seed(cfg.seed * 100003 + seed)
        return torch.rand(experts, inter, generator=g, dtype=torch.float64), 0
    p = 2 if cfg.importance == "l2" else 1

    def norms(taylor: bool) -> torch.Tensor:
        score = torch.zeros(experts, inter, dtype=torch.float64)
        for pname, dim, positions in _neuron_rows(m, inter):
            x = getattr(m, pname).detach().float()
            if taylor:
                x = x * grads[f"{name}.{pname}"].float()
            x = x.index_select(dim, positions).movedim(dim, 1).contiguous()  # [experts, inter, ...]
            score += prune_ops.scores(x.reshape(experts * inter, -1), p).double().reshape(experts, inter, -1).sum(2)
        return score

    score = norms(cfg.importance == "taylor")
    if cfg.importance != "taylor":
        return score, 0
    unreached = ~score.any(dim=1)
    if unreached.any():
        score[unreached] = norms(False)[unreached]
    return score, int(unreached.sum())


def _pruned(m: nn.Module, keep: torch.Tensor, inter: int) -> Dict[str, torch.Tensor]:
    """The module's new tensors for keep [experts, kept] neuron indices."""
    first, first_bias = _params(m)
    rows = _first_rows(m, inter)[:, keep]  # [rows per neuron, experts, kept]
    # in the layout's order: gates then ups (concatenated), or each gate beside its up
    idx = (rows.permute(1, 0, 2) if m.has_gate and m.is_concatenated else rows.permute(1, 2, 0))
    idx = idx.reshape(keep.shape[0], -1)  # [experts, rows]
    d1, d2 = _dims(m)

    def take(t: torch.Tensor, dim: int, rows: torch.Tensor) -> torch.Tensor:
        shape = [1] * t.dim()
        shape[0], shape[dim] = rows.shape[0], rows.shape[1]
        index = rows.view(shape).expand(*[rows.shape[1] if d == dim else s for d, s in enumerate(t.shape)])
        return torch.gather(t.detach(), dim, index).contiguous()

    new = {first: take(getattr(m, first), d1, idx), "down_proj": take(m.down_proj, d2, keep)}
    if m.has_bias:
        new[first_bias] = take(getattr(m, first_bias), 1, idx)
    return new


def _zeroed(m: nn.Module, keep: torch.Tensor, inter: int) -> Dict[str, torch.Tensor]:
    """The module's tensors with every neuron outside keep zeroed (the check's reference)."""
    out = {}
    gone = torch.ones(keep.shape[0], inter, dtype=torch.bool).scatter_(1, keep, False)
    for pname, dim, positions in _neuron_rows(m, inter):
        z = out.get(pname, getattr(m, pname).detach().clone())
        shape = [1] * z.dim()
        shape[0], shape[dim] = z.shape[0], z.shape[dim]
        z.masked_fill_(_mask(gone, positions, z.shape[dim]).view(shape), 0.0)
        out[pname] = z
    _, first_bias = _params(m)
    if m.has_bias:
        size = getattr(m, first_bias).shape[1]
        rows = torch.stack([_mask(gone, r, size) for r in _first_rows(m, inter)]).any(0)
        out[first_bias] = getattr(m, first_bias).detach().clone().masked_fill_(rows, 0.0)
    return out


def _run(m: nn.Module, tensors: Dict[str, torch.Tensor], x, index, weights) -> torch.Tensor:
    """m's forward with `tensors` (and every other parameter) in float32, so that a half
    model's roundings cannot tell the pruned module from its zeroed original."""
    saved = dict(m.named_parameters(recurse=False))
    try:
        for n, p in saved.items():
            setattr(m, n, nn.Parameter(tensors.get(n, p.detach()).float(), requires_grad=False))
        with torch.no_grad():
            return m(x, index, weights)
    finally:
        for n, p in saved.items():
            setattr(m, n, p)


def prune_expert_neurons(chosen: Dict[str, Tuple[nn.Module, int, int]], cfg,
                         grads: Optional[Dict[str, torch.Tensor]], record: dict, unpruned: dict) -> List[LayerChange]:
    """Prune the experts `selected` chose (see the module doc); grads: the taylor gradients.
    record / unpruned: the model's structured-size record and sizes before, updated."""
    rows: List[LayerChange] = []
    for k, (name, (m, inter, kept)) in enumerate(chosen.items()):
        scores, unreached = _scores(m, name, inter, cfg, grads, k)
        keep = torch.sort(torch.argsort(scores, dim=1, descending=True, stable=True)[:, :kept], dim=1).values
        new, zeroed = _pruned(m, keep, inter), _zeroed(m, keep, inter)
        experts, hidden = m.down_proj.shape[0], _shape(m.down_proj, m.is_transposed)[1]
        g = torch.Generator().manual_seed(k)
        x = torch.randn(16, hidden, generator=g)
        index = torch.stack([torch.randperm(experts, generator=g)[:min(2, experts)] for _ in range(16)])
        weights = torch.rand(16, index.shape[1], generator=g)
        got, want = _run(m, new, x, index, weights), _run(m, zeroed, x, index, weights)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6):
            rows.append(LayerChange(name, type(m).__name__, "skipped", bytes_before=module_bytes(m),
                                    reason="its forward does not compute the experts as their weights say "
                                           "(the pruned module differed from its zeroed original)"))
            continue
        before = module_bytes(m)
        for n, t in new.items():
            old = getattr(m, n)
            setattr(m, n, nn.Parameter(t, requires_grad=old.requires_grad))
        sizes = {}
        count = intermediate_attr(m)
        if count is not None:
            setattr(m, count, kept)
            sizes[count] = kept
        record.setdefault(name, {}).update(sizes)
        unpruned.setdefault(name, before)
        rows.append(LayerChange(name, type(m).__name__, "pruned",
                                f"expert neurons removed: {experts} experts x {inter} -> {kept}", before,
                                module_bytes(m), f"{unreached} experts without a gradient ranked by l1"
                                if unreached else ""))
    return rows
