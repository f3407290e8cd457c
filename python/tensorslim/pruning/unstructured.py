"""Unstructured pruning: masks for Magnitude (layer / global scope) and RandomPrune.
Every mask is computed before any layer is touched, so an error leaves the model as it was.
transformers' Conv1D (GPT-2) is masked on its own [in, out] weight and stays a Conv1D; its mask
is ranked on the [out, in] view, so ties and random scores fall as on the nn.Linear it equals."""
from typing import Dict, List, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .._user_warning import warn_user
from ..conv1d import conv1d_types, out_in
from ..ops import prune as prune_ops
from ..report import LayerChange, Report, module_bytes, remember_skipped
from ..transforms import _is_weight_matrix_layer, _tied_to_embedding, filter_reason, held_weights_row
from . import masks
from .config import Magnitude, RandomPrune, _Unstructured
from .select import global_counts

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def select_layers(model: nn.Module, cfg, supported=None) -> Tuple[List[Tuple[str, nn.Module]], Report]:
    """The layers the config's filter selects, and a Report of the ones it leaves alone.
    supported defaults to PRUNABLE plus transformers' Conv1D when transformers is loaded."""
    supported = PRUNABLE + conv1d_types() if supported is None else supported
    tied = _tied_to_embedding(model)
    todo, report = [], Report()
    for name, mod in model.named_modules():
        if not name:
            continue
        if isinstance(mod, supported):
            reason = filter_reason(name, mod, cfg, tied)
            if reason is None and mod.weight.numel() == 0:
                reason = "zero-size weight"
            if reason:
                report.changes.append(LayerChange(name, type(mod).__name__, "skipped",
                                                  bytes_before=module_bytes(mod), reason=reason))
            else:
                todo.append((name, mod))
        elif _is_weight_matrix_layer(mod):
            report.changes.append(LayerChange(name, type(mod).__name__, "skipped", bytes_before=module_bytes(mod),
                                              reason=f"{type(mod).__name__} layers are not pruned"))
        elif (row := held_weights_row(name, mod, "are not pruned")) is not None:
            report.changes.append(row)
    return todo, report


def _check_finite(name: str, mod: nn.Module) -> None:
    if mod.weight.device.type == "meta":
        raise ValueError(f"layer '{name}' ({type(mod).__name__}): weight is on the meta device (no data to rank); "
                         f"load the weights first, or leave it out with exclude=[{name!r}]")
    if not torch.isfinite(mod.weight).all():
        raise ValueError(f"layer '{name}' ({type(mod).__name__}): weight contains NaN or Inf; "
                         "pruning ranks weights by magnitude and cannot place them")


def _bounds(cfg: _Unstructured, n: int) -> Tuple[int, int]:
    return round(cfg.min_layer_sparsity * n), round(cfg.max_layer_sparsity * n)


def _mask_for(w: torch.Tensor, k: int, p: int) -> torch.Tensor:
    """Keep-mask pruning exactly the k smallest |w|^p (ties in index order)."""
    if k == 0:
        return torch.ones(w.shape, dtype=torch.uint8)
    t = prune_ops.kth_smallest(w, k, p)  # selection over one layer's score buffer
    return prune_ops.keep_mask(w, k, t, p)


def compute_masks(layers: List[Tuple[str, nn.Module]], cfg: _Unstructured, sparsity: float,
                  progress: bool = False) -> Dict[str, torch.Tensor]:
    """{name: uint8 keep-mask} at `sparsity` (the schedule passes its own), nothing applied."""
    for name, mod in layers:
        _check_finite(name, mod)
    bar = tqdm(total=len(layers), desc="tensorslim prune", disable=not progress or len(layers) < 2, leave=False)
    out: Dict[str, torch.Tensor] = {}
    if isinstance(cfg, RandomPrune):
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, mod in layers:
            n = mod.weight.numel()
            lo, hi = _bounds(cfg, n)
            u = torch.rand(n, generator=gen)  # random scores, ranked like magnitudes
            keep = _mask_for(u, min(max(round(sparsity * n), lo), hi), 1)
            out[name] = out_in(mod, keep.reshape(out_in(mod, mod.weight).shape))
            bar.update()
        bar.close()
        return out
    assert isinstance(cfg, Magnitude)
    p = cfg.norm
    if cfg.scope == "layer":
        for name, mod in layers:
            n = mod.weight.numel()
            lo, hi = _bounds(cfg, n)
            w = out_in(mod, mod.weight)
            out[name] = out_in(mod, _mask_for(w, min(max(round(sparsity * n), lo), hi), p).reshape(w.shape))
            bar.update()
        bar.close()
        return out
    weights = [mod.weight for _, mod in layers]  # counts below do not depend on the layout
    sizes = [w.numel() for w in weights]
    bounds = [_bounds(cfg, n) for n in sizes]
    # sum_l k_l = round(sparsity * N) exactly; floors / ceilings bound each layer, and win where
    # the total leaves their range, as in the layer scope (a schedule's first steps ask less
    # than min_layer_sparsity: every layer then sits at its floor).
    lo, hi = [b[0] for b in bounds], [b[1] for b in bounds]
    total = min(max(round(sparsity * sum(sizes)), sum(lo)), sum(hi))
    counts, t, on_t = global_counts(weights, p, total, lo, hi)
    for (name, mod), k, at_t in zip(layers, counts, on_t):
        w = out_in(mod, mod.weight)  # ties at t are taken in [out, in] index order
        keep = prune_ops.keep_mask(w, k, t, p) if at_t else _mask_for(w, k, p)
        out[name] = out_in(mod, keep.reshape(w.shape))
        bar.update()
    bar.close()
    return out


def describe(cfg: _Unstructured) -> str:
    if isinstance(cfg, RandomPrune):
        return f"random (seed {cfg.seed})"
    return f"magnitude L{cfg.norm} {cfg.scope}"


def _warn_if_restoring(layers, new_masks) -> None:
    """A new mask that keeps weights an earlier one pruned (a lower sparsity than before, or
    another random draw): they are zero now but train again; the report's sparsity counts
    them as zeros until they do."""
    restored = []
    for name, mod in layers:
        if masks.is_masked(mod):
            old = getattr(mod, masks.MASK).to(new_masks[name].device)
            n = int((new_masks[name].reshape(old.shape) & ~old).sum())
            if n:
                restored.append(f"{name} ({n})")
    if restored:
        listed = ", ".join(restored[:8]) + (" ..." if len(restored) > 8 else "")
        warn_user(f"ts.prune: the new masks keep weights that earlier pruning removed; they are zero now "
                  f"but will train again: {listed}. Prune at a sparsity at least the current one to keep "
                  f"them removed.")


def prune_unstructured(model: nn.Module, cfg: _Unstructured, sparsity: float = None,
                       progress: bool = True) -> Report:
    sparsity = cfg.sparsity if sparsity is None else sparsity
    layers, report = select_layers(model, cfg)
    before = {name: module_bytes(mod) for name, mod in layers}
    new_masks = compute_masks(layers, cfg, sparsity, progress)  # may raise: nothing touched yet
    _warn_if_restoring(layers, new_masks)
    for name, mod in layers:
        masks.attach(mod, new_masks.pop(name))  # each layer's computed mask freed once attached
        report.changes.append(LayerChange(name, type(mod).__name__, "pruned",
                                          f"{describe(cfg)}: {masks.sparsity(mod):.1%} sparse",
                                          before[name], module_bytes(mod),
                                          reason="dense weight + bool mask (sparse storage: ts.sparsify)"))
    remember_skipped(model, report)
    return report
