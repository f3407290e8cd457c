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
     if the float block's output is unchanged (checked on the first calibration batch and on
     the first one the group runs on; all of a block's groups first fold into their first
     candidates and are checked together, then one at a time only if that check fails), so
     residual paths and non-linear functions are never folded through. A group with no
     valid fold gets an input scale instead: its WeightOnlyLinear layers keep W * s and
     multiply their input by 1 / s (one fp32 vector per layer, an elementwise product per call);
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
from . import token_mask
from .gram import add_gram_upper_, symmetric
from .blockwise import Edits, Inputs, WeightSpec, calibrate_blockwise, errors_named, make_layer, run_block
from ..config import AWQ
from ..transforms import float_weight
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
    batch: int = 0                   # the first calibration batch it ran on
    gram: Optional[torch.Tensor] = None     # sum x^T x, float64
    abs_sum: Optional[torch.Tensor] = None  # sum |x| per channel, float64
    count: int = 0


def _foldable(mod: nn.Module, width: int) -> bool:
    """A module whose output channels can absorb 1/s: a Linear or an affine norm."""
    if isinstance(mod, nn.Linear):
        return mod.out_features == width
    weight = float_weight(mod)
    is_norm = isinstance(mod, nn.LayerNorm) or type(mod).__name__.lower().endswith("rmsnorm")
    return is_norm and isinstance(weight, nn.Parameter) and weight.shape == (width,)


def collect_groups(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs, keep_outputs: bool = False
                   ) -> Tuple[List[InputGroup], Dict[str, int], Dict[int, torch.Tensor]]:
    """Group the targets by shared input (on the first batch each runs on), accumulate each
    input's Gram matrix and mean |x| over the batches it runs on; also the execution step of
    every module, up to the last target's first run, and the (float) block's output on the
    first batch and on each group's first batch, or on every batch with keep_outputs."""
    groups: List[InputGroup] = []
    group_of: Dict[str, int] = {}
    steps: Dict[str, int] = {}
    produced: Dict[int, Tuple[str, torch.Tensor]] = {}  # this batch: id(output) -> (module, output)
    batch_inputs: List[Tuple[torch.Tensor, int]] = []   # this batch: (group input, group index)
    batch = [0]

    def grouping() -> bool:  # the bookkeeping below is needed until every target has a group
        return len(group_of) < len(targets)

    def module_hook(name):
        def fn(mod, args, out):
            if not grouping():
                return
            steps.setdefault(name, len(steps))
            if isinstance(out, torch.Tensor):
                produced.setdefault(id(out), (name, out))  # innermost module first
        return fn

    def group_index(name: str, x: torch.Tensor) -> int:
        if name in group_of:  # a layer called twice keeps its first input's group
            return group_of[name]
        idx = next((g for t, g in batch_inputs if t is x), None)
        if idx is None:
            prod = produced.get(id(x))
            groups.append(InputGroup([], steps.get(name, len(steps)),
                                     prod[0] if prod is not None and prod[1] is x else None, batch[0]))
            idx = len(groups) - 1
        groups[idx].names.append(name)
        group_of[name] = idx
        return idx

    def target_hook(name):
        def fn(mod, args, out):
            x = args[0]
            idx = group_index(name, x)
            if any(t is x and g == idx for t, g in batch_inputs):
                return  # an input its group shares (q / k / v) counts once per batch; a layer
                # applied again to another tensor (shared weights) adds those rows too
            batch_inputs.append((x, idx))
            g = groups[idx]
            x2 = token_mask.rows(x.detach(), mod.in_features).float()
            if g.gram is None:
                g.gram = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64, device=x.device)
                g.abs_sum = torch.zeros(mod.in_features, dtype=torch.float64, device=x.device)
            add_gram_upper_(g.gram, x2)  # float32 products, float64 sums (gram.py)
            g.abs_sum += x2.abs().sum(0, dtype=torch.float64)
            g.count += x2.shape[0]
        return fn

    target_ids = {id(m) for m in targets.values()}
    handles = [m.register_forward_hook(module_hook(n)) for n, m in block.named_modules()
               if n and id(m) not in target_ids]
    handles += [m.register_forward_hook(module_hook(n)) for n, m in targets.items()]
    handles += [m.register_forward_hook(target_hook(n)) for n, m in targets.items()]
    outputs: Dict[int, torch.Tensor] = {}
    try:
        for i, inp in enumerate(inputs):
            batch[0] = i
            out = run_block(block, inp)
            if keep_outputs or i == 0 or any(g.batch == i for g in groups):
                outputs[i] = out
            produced.clear()
            batch_inputs.clear()
    finally:
        for h in handles:
            h.remove()
    missing = set(targets) - set(group_of)
    if missing:  # calibrate_blockwise skips such layers before calling us
        raise ValueError(f"layers {sorted(missing)} never ran on the calibration data")
    for g in groups:
        symmetric(g.gram)
    return sorted(groups, key=lambda g: g.step), steps, outputs


def _fold(prev: nn.Module, layers: List[nn.Linear], s: torch.Tensor, edits: Edits) -> None:
    """prev's output channels / s, the layers' input channels * s (same function)."""
    def param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
        if t.is_inference():  # ts.quantize called under torch.inference_mode: a normal tensor, else
            with torch.inference_mode(False):  # the model's later forwards with grad fail on it
                t = t.clone()
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


def _output_kept(block: nn.Module, checks, inputs: Inputs, refs: Dict[int, torch.Tensor], fold_tol: float) -> bool:
    return all(_relative_change(run_block(block, inputs[b]), refs[b], inputs[b]) <= fold_tol for b in sorted(checks))


def _fold_somewhere(block: nn.Module, group: InputGroup, layers: List[nn.Linear], s: torch.Tensor,
                    steps: Dict[str, int], inputs: Inputs, refs: Dict[int, torch.Tensor], edits: Edits,
                    fold_tol: float, skip: int = 0) -> Optional[str]:
    """Fold s into the first candidate (past the `skip` first ones, known not to) that keeps the
    float block's output (on the first batch and on the first batch the group ran on); None,
    with nothing changed, if none does."""
    checks = {0, group.batch}  # a branch-only group: also where its branch is not taken
    for cand in _candidates(block, group, steps, layers[0].in_features)[skip:]:
        mark = edits.mark()
        _fold(block.get_submodule(cand), layers, s, edits)
        if _output_kept(block, checks, inputs, refs, fold_tol):
            return cand
        edits.undo(mark)
    return None


def _fold_all_first(block: nn.Module, todo: List[Tuple[InputGroup, List[nn.Linear], torch.Tensor]],
                    steps: Dict[str, int], inputs: Inputs, refs: Dict[int, torch.Tensor], edits: Edits,
                    fold_tol: float) -> Tuple[Dict[int, str], bool]:
    """Every group of `todo` folded into its first candidate at once and checked together:
    one block run per check batch instead of one per group, since valid folds are the rule.
    Returns ({index in todo: candidate}, True) if the float block's output is kept; else
    nothing stays changed and the groups must be folded one at a time (_fold_somewhere).
    A group's folds touch only its own layers and modules that run before it, never a later
    group's weights, so the scale searches need not wait for the earlier groups' folds."""
    mark = edits.mark()
    chosen: Dict[int, str] = {}
    checks = {0}
    for i, (g, layers, s) in enumerate(todo):
        cands = _candidates(block, g, steps, layers[0].in_features)
        if cands:
            _fold(block.get_submodule(cands[0]), layers, s, edits)
            chosen[i] = cands[0]
            checks.add(g.batch)
    if not chosen or _output_kept(block, checks, inputs, refs, fold_tol):
        return chosen, True
    edits.undo(mark)
    return chosen, False


def awq_block(spec: WeightSpec, n_grid: int = N_GRID, max_shrink: float = MAX_SHRINK,
              fold_tol: float = FOLD_TOL, input_scales: bool = True):
    """The per-block step of the pipeline for these settings.

    input_scales: a group with no valid fold gets an input scale (otherwise it stays unscaled
    and gets the clip search only, as before input scales existed).
    """

    def quantize_block(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs, edits: Edits,
                       outputs: Optional[list] = None):
        groups, steps, float_outs = collect_groups(block, targets, inputs, keep_outputs=outputs is not None)
        refs = {b: float_outs[b] for b in {0} | {g.batch for g in groups}}  # before any fold
        if outputs is not None:  # the pipeline's next inputs: no second float forward
            outputs.extend(float_outs[i] for i in range(len(inputs)))
        del float_outs
        notes: Dict[str, str] = {}
        grams: Dict[str, torch.Tensor] = {}
        in_scales: Dict[str, torch.Tensor] = {}  # layer -> s, for groups scaled at their input
        searched = []
        for g in groups:
            if g.count == 0:  # 0-row batches only: no statistics to search on (would give NaN)
                raise ValueError("the calibration data reached the layers with 0 rows (empty batches); "
                                 "AWQ needs at least one row of activations")
            layers = [targets[n] for n in g.names]
            width = layers[0].in_features
            gram = (g.gram / g.count).float().cpu()  # the searches run on the CPU core
            act = (g.abs_sum / g.count).float().cpu()
            if not (torch.isfinite(gram).all() and torch.isfinite(act).all()):  # the core's message names "g"
                where = ", ".join(f"'{n}'" for n in g.names) if any(g.names) else "its linear"
                raise ValueError(f"the calibration activations reaching {where} contain NaN or Inf (or overflow "
                                 f"float32 in their statistics)")
            w = torch.cat([lin.weight.detach().float() for lin in layers])
            k, _ = C.awq_search_scale(w, gram, act, spec.bits, spec.symmetric, spec.group_for(width), n_grid)
            s = C.awq_scales(act, k, n_grid) if k > 0 else torch.ones_like(act)
            searched.append((g, layers, gram, s, k))
        todo = [(g, layers, s) for g, layers, _, s, k in searched if k > 0]
        first, kept = _fold_all_first(block, todo, steps, inputs, refs, edits, fold_tol)
        for g, layers, gram, s, k in searched:
            note = f"awq alpha={k / n_grid:.2f}"
            if k > 0:
                i = next(i for i, t in enumerate(todo) if t[0] is g)
                # the first candidate failed alone if it was the only fold checked
                folded = first.get(i) if kept else _fold_somewhere(block, g, layers, s, steps, inputs, refs, edits,
                                                                   fold_tol, skip=int(len(first) == 1 and i in first))
                if folded:
                    note += f" folded into {folded}"
                elif input_scales:  # same error as a fold (the search measured it), paid at run time
                    note += " input-scaled (no foldable op before it)"
                    in_scales.update(dict.fromkeys(g.names, s))
                else:
                    note += " (no foldable op before it: unscaled)"
                    s = torch.ones_like(s)
            g_scaled = gram / (s[:, None] * s[None, :])
            for n in g.names:
                notes[n], grams[n] = note, g_scaled
        new = {}
        for name, lin in targets.items():
            group = spec.group_for(lin.in_features)
            w = lin.weight.detach().float()
            s = in_scales.get(name)
            if s is not None:  # folded groups already hold W * s (an edit); these get it here
                w = w * s.to(w.device)[None, :]
            with errors_named(f"layer '{name}'" if name else ""):
                ratio, _ = C.awq_search_clip(w, grams[name], spec.bits, spec.symmetric, group, n_grid, max_shrink)
            codes, scales, zps = C.quantize_codes_reference(w.cpu(), spec.bits, spec.symmetric, group, ratio)
            new[name] = (make_layer(lin, codes, scales, zps, spec, None if s is None else 1.0 / s),
                         f"{spec.describe(lin.in_features)} {notes[name]}")
        # The float layers leave the model now: give them back their original weights and
        # free the scaled copies (the norms keep their folded scales: they stay in the model).
        edits.restore(targets.values())
        return new

    return quantize_block


def quantize_awq(model: nn.Module, spec: WeightSpec, forward_loop, cfg=None, n_grid: int = N_GRID,
                 max_shrink: float = MAX_SHRINK, progress: bool = True, input_scales: bool = True):
    """AWQ with explicit settings (also used to simulate bit widths the format table lacks)."""
    from ..config import LayerFilter

    cfg = cfg if cfg is not None else LayerFilter()
    return calibrate_blockwise(model, cfg, forward_loop, spec,
                               awq_block(spec, n_grid, max_shrink, input_scales=input_scales),
                               lambda c, n, m: check_linear(SimpleNamespace(group_size=spec.group_size), n, m),
                               "awq", feed_quantized=False, progress=progress, float_outputs=True)


@register_algorithm("awq", "activation-aware scaling (AWQ)")
def apply_awq(model: nn.Module, cfg, forward_loop=None, progress: bool = True):
    spec = WeightSpec(cfg.bits, cfg.symmetric, cfg.group_size, cfg.backend)
    return quantize_awq(model, spec, forward_loop, cfg, n_grid=getattr(cfg, "n_grid", N_GRID),
                        max_shrink=getattr(cfg, "max_shrink", MAX_SHRINK), progress=progress)


register_transform(AWQ)(apply_weight_only)  # ts.AWQ(n_grid=..., ...) dispatches like IntWeightOnly
