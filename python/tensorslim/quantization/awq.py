"""AWQ: activation-aware weight quantization (Lin et al., 2023), block by block.

Per block, the Linear layers that read the same input tensor form a group (q/k/v, gate/up).
For each group:
  1. scale search (C++ core, ops.calibration.awq_search_scale): s = s_X^alpha with s_X the
     mean |x| per input channel and alpha on a 20-point grid, chosen to minimize the group's
     output error on the calibration inputs after quantization (d^T G d, G = X^T X / n);
  2. folding: the weights are multiplied by s per input channel and the operation that
     produces their input (a LayerNorm / RMSNorm, or a Linear such as v_proj before o_proj
     and up_proj before down_proj) is divided by s. Candidates are the module whose output
     the group reads and the earlier norms / Linears of matching width; a fold is kept only
     if the float block's output is unchanged (checked on one calibration batch), so
     residual paths and non-linear functions are never folded through. A group with no
     valid fold keeps s = 1;
  3. clip search (C++ core, ops.calibration.awq_search_clip): per output row and group, the
     range shrink (1.0 down to 0.55) that minimizes the group's output error;
  4. the codes of the clipped round-to-nearest grid become a packed WeightOnlyLinear.

The next block is calibrated on the float block's outputs, as in the paper.

    ts.quantize(model, ts.Int4WeightOnly(algorithm="awq"), calib_data=batches)
"""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..ops import calibration as C
from .blockwise import Edits, Inputs, WeightSpec, calibrate_blockwise, make_layer, run_block
from ..config import AWQ
from .registry import register_transform
from .weight_only import apply_weight_only, check_linear, register_algorithm

N_GRID = 20        # alpha = k / 20, k = 0..19
MAX_SHRINK = 0.5   # clip ratios 1.0, 0.95, ..., 0.55
FOLD_TOL = 1e-4    # change of the float block's output a fold may cause, relative to the block's update


@dataclass
class InputGroup:
    """Target layers reading one input tensor, and that input's statistics."""

    names: List[str]
    step: int                        # when its first layer ran (execution order)
    producer: Optional[str] = None   # the module whose output object is the input
    gram: Optional[torch.Tensor] = None     # sum x^T x, float64
    abs_sum: Optional[torch.Tensor] = None  # sum |x| per channel, float64
    count: int = 0


def _foldable(mod: nn.Module, width: int) -> bool:
    """A module whose output channels can absorb 1/s: a Linear or an affine norm."""
    if isinstance(mod, nn.Linear):
        return mod.out_features == width
    weight = getattr(mod, "weight", None)
    is_norm = isinstance(mod, nn.LayerNorm) or type(mod).__name__.lower().endswith("rmsnorm")
    return is_norm and isinstance(weight, nn.Parameter) and weight.shape == (width,)


def collect_groups(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs
                   ) -> Tuple[List[InputGroup], Dict[str, int]]:
    """Group the targets by shared input (seen on the first batch), accumulate each input's
    Gram matrix and mean |x| over all batches; also the execution step of every module."""
    groups: List[InputGroup] = []
    group_of: Dict[str, int] = {}
    steps: Dict[str, int] = {}
    produced: Dict[int, Tuple[str, torch.Tensor]] = {}
    seen: List[Tuple[torch.Tensor, int]] = []
    first = [True]

    def module_hook(name):
        def fn(mod, args, out):
            if not first[0]:
                return
            steps.setdefault(name, len(steps))
            if isinstance(out, torch.Tensor):
                produced.setdefault(id(out), (name, out))  # innermost module first
        return fn

    def target_hook(name):
        def fn(mod, args, out):
            x = args[0]
            if first[0] and name not in group_of:  # a layer called twice keeps its first input
                idx = next((g for t, g in seen if t is x), None)
                if idx is None:
                    prod = produced.get(id(x))
                    groups.append(InputGroup([], steps.get(name, len(steps)),
                                             prod[0] if prod is not None and prod[1] is x else None))
                    idx = len(groups) - 1
                    seen.append((x, idx))
                groups[idx].names.append(name)
                group_of[name] = idx
            g = groups[group_of[name]]
            if g.names[0] != name or (first[0] and x is not next(t for t, i in seen if i == group_of[name])):
                return  # the group's statistics are gathered once per batch
            x2 = x.detach().reshape(-1, mod.in_features).double()
            if g.gram is None:
                g.gram = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64, device=x.device)
                g.abs_sum = torch.zeros(mod.in_features, dtype=torch.float64, device=x.device)
            g.gram.addmm_(x2.T, x2)
            g.abs_sum += x2.abs().sum(0)
            g.count += x2.shape[0]
        return fn

    target_ids = {id(m) for m in targets.values()}
    handles = [m.register_forward_hook(module_hook(n)) for n, m in block.named_modules()
               if n and id(m) not in target_ids]
    handles += [m.register_forward_hook(module_hook(n)) for n, m in targets.items()]
    handles += [m.register_forward_hook(target_hook(n)) for n, m in targets.items()]
    try:
        for i, inp in enumerate(inputs):
            first[0] = i == 0
            run_block(block, inp)
    finally:
        for h in handles:
            h.remove()
    missing = set(targets) - set(group_of)
    if missing:
        raise ValueError(f"layers {sorted(missing)} never ran on the calibration data")
    return sorted(groups, key=lambda g: g.step), steps


def _fold(prev: nn.Module, layers: List[nn.Linear], s: torch.Tensor, edits: Edits) -> None:
    """prev's output channels / s, the layers' input channels * s (same function)."""
    def param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(t, requires_grad=like.requires_grad)

    with torch.no_grad():
        sp = s.to(prev.weight.device, prev.weight.dtype)
        if isinstance(prev, nn.Linear):
            edits.set(prev, "weight", param(prev.weight / sp[:, None], prev.weight))
        else:
            edits.set(prev, "weight", param(prev.weight / sp, prev.weight))
        if getattr(prev, "bias", None) is not None:
            edits.set(prev, "bias", param(prev.bias / sp, prev.bias))
        for lin in layers:
            scaled = lin.weight * s.to(lin.weight.device, lin.weight.dtype)[None, :]
            edits.set(lin, "weight", param(scaled, lin.weight))


def _candidates(block: nn.Module, group: InputGroup, steps: Dict[str, int], width: int) -> List[str]:
    """Modules the group's scale could fold into: its input's producer, then earlier
    foldable modules of the same width, nearest first."""
    out = [group.producer] if group.producer is not None else []
    earlier = [(st, n) for n, st in steps.items() if st < group.step and n not in group.names]
    for _, n in sorted(earlier, reverse=True):
        if n not in out:
            out.append(n)
    return [n for n in out if _foldable(block.get_submodule(n), width)]


def _relative_change(out: torch.Tensor, ref: torch.Tensor, inp) -> float:
    """|out - ref| relative to what the block adds to its input (residual blocks would
    otherwise hide a wrong fold behind a large residual stream), or to |ref|."""
    args, kwargs = inp
    hidden = args[0] if args else kwargs.get("hidden_states")
    base = ref.double()
    if isinstance(hidden, torch.Tensor) and hidden.shape == ref.shape:
        base = base - hidden.double()
    return float((out.double() - ref.double()).norm() / base.norm().clamp(min=1e-30))


def awq_block(spec: WeightSpec, n_grid: int = N_GRID, max_shrink: float = MAX_SHRINK,
              fold_tol: float = FOLD_TOL):
    """The per-block step of the pipeline for these settings."""

    def quantize_block(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs, edits: Edits):
        groups, steps = collect_groups(block, targets, inputs)
        ref = run_block(block, inputs[0])
        notes: Dict[str, str] = {}
        grams: Dict[str, torch.Tensor] = {}
        for g in groups:
            layers = [targets[n] for n in g.names]
            width = layers[0].in_features
            gram = (g.gram / g.count).float().cpu()  # the searches run on the CPU core
            act = (g.abs_sum / g.count).float().cpu()
            w = torch.cat([lin.weight.detach().float() for lin in layers])
            k, _ = C.awq_search_scale(w, gram, act, spec.bits, spec.symmetric, spec.group_for(width), n_grid)
            note = f"awq alpha={k / n_grid:.2f}"
            s = C.awq_scales(act, k, n_grid)
            folded = None
            if k > 0:
                for cand in _candidates(block, g, steps, width):
                    mark = edits.mark()
                    _fold(block.get_submodule(cand), layers, s, edits)
                    if _relative_change(run_block(block, inputs[0]), ref, inputs[0]) <= fold_tol:
                        folded = cand
                        break
                    edits.undo(mark)
                note += f" folded into {folded}" if folded else " (no foldable op before it: unscaled)"
            s_used = s if folded else torch.ones_like(s)
            g_scaled = gram / (s_used[:, None] * s_used[None, :])
            for n in g.names:
                notes[n], grams[n] = note, g_scaled
        new = {}
        for name, lin in targets.items():
            group = spec.group_for(lin.in_features)
            w = lin.weight.detach().float()
            ratio, _ = C.awq_search_clip(w, grams[name], spec.bits, spec.symmetric, group, n_grid, max_shrink)
            codes, scales, zps = C.quantize_codes_reference(w.cpu(), spec.bits, spec.symmetric, group, ratio)
            new[name] = (make_layer(lin, codes, scales, zps, spec),
                         f"{spec.describe(lin.in_features)} {notes[name]}")
        # The float layers leave the model now: give them back their original weights and
        # free the scaled copies (the norms keep their folded scales: they stay in the model).
        edits.restore(targets.values())
        return new

    return quantize_block


def quantize_awq(model: nn.Module, spec: WeightSpec, forward_loop, cfg=None, n_grid: int = N_GRID,
                 max_shrink: float = MAX_SHRINK, progress: bool = True):
    """AWQ with explicit settings (also used to simulate bit widths the format table lacks)."""
    from ..config import LayerFilter

    cfg = cfg if cfg is not None else LayerFilter()
    return calibrate_blockwise(model, cfg, forward_loop, spec, awq_block(spec, n_grid, max_shrink),
                               lambda c, n, m: check_linear(SimpleNamespace(group_size=spec.group_size), n, m),
                               "awq", feed_quantized=False, progress=progress)


@register_algorithm("awq", "activation-aware scaling (AWQ)")
def apply_awq(model: nn.Module, cfg, forward_loop=None, progress: bool = True):
    spec = WeightSpec(cfg.bits, cfg.symmetric, cfg.group_size, cfg.backend)
    return quantize_awq(model, spec, forward_loop, cfg, n_grid=getattr(cfg, "n_grid", N_GRID),
                        max_shrink=getattr(cfg, "max_shrink", MAX_SHRINK), progress=progress)


register_transform(AWQ)(apply_weight_only)  # ts.AWQ(n_grid=..., ...) dispatches like IntWeightOnly
