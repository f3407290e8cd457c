"""GPTQ weight-only quantization (Frantar et al., 2022), block by block.

For each Linear layer of a block, H = 2/n * sum x x^T is accumulated (gram.py) over the
block's calibration inputs; the C++ core (ops.calibration.gptq_quantize) then chooses the
integer codes column by column, compensating each rounding error on the columns still to
come. The next block is calibrated on the quantized block's outputs.

    ts.quantize(model, ts.Int4WeightOnly(algorithm="gptq"), calib_data=batches)
"""
from types import SimpleNamespace
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..ops import calibration as C
from . import token_mask
from .gram import gram_upper, symmetric
from .blockwise import (Edits, FloatReference, Inputs, StopAtLastCall, WeightSpec, calibrate_blockwise, errors_named,
                        make_layer, run_block, set_submodule, warn_damping)
from ..config import GPTQ
from .registry import register_transform
from .weight_only import apply_weight_only, check_linear, register_algorithm

DAMP = 0.01        # fraction of mean(diag H) added to the diagonal
BLOCK_SIZE = 128   # lazy-update block
FIT_DAMP = 0.1     # ridge of fit_float_outputs, as a fraction of mean(diag H): on MiniLM INT4
                   # 0.01 gave cosine 0.9858, 0.1 and 1.0 both 0.9883 (act_order, 64 sentences)


class Statistics(NamedTuple):
    hessians: Dict[str, torch.Tensor]
    crosses: Dict[str, torch.Tensor]   # only with a float reference
    first: List[str]
    shared: List[List[str]] = []       # layers whose H are the same sums (same inputs, every call)


def accumulate_hessians(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs,
                         reference: Optional[FloatReference] = None, first_only: bool = False) -> Statistics:
    """H = 2/n * sum over the block's calibration tokens of x x^T, per target layer (float64
    sums of float32 products, see gram.py),
    and the targets that run first (those reading the first target's input tensor).
    first_only: statistics only for those first targets (sequential GPTQ measures the others
    again once the first group is quantized), so only their matrices are ever allocated.

    With a float reference, also C = 2/n * sum x_float x^T: the float block run on the float
    model's inputs, token for token beside this block on the pipeline's inputs. A layer whose
    calls do not pair up one to one (different shapes or counts) gets no C.

    The block's forward stops at the last target call these statistics need (StopAtLastCall):
    its output is not used (the pipeline runs the quantized block for the next inputs)."""
    sums: Dict[str, torch.Tensor] = {}     # allocated on a layer's first call
    crosses: Dict[str, torch.Tensor] = {}
    unpaired: set = set()                   # layers whose float and quantized calls did not pair up
    float_x: Dict[str, List[torch.Tensor]] = {n: [] for n in targets} if reference is not None else {}
    counts = dict.fromkeys(targets, 0)
    first_input: List[torch.Tensor] = []
    first: List[str] = []

    def wanted(name: str) -> bool:
        return not (first_only and first and name not in first)

    def float_hook(name):
        def fn(mod, args, out):
            if wanted(name) and name not in unpaired:
                float_x[name].append(token_mask.layer_rows(mod, args[0].detach()).double())
        return fn

    def hook(name):
        def fn(mod, args):
            if counts[name] == 0 and not sums_seen[0]:
                if not first_input:
                    first_input.append(args[0])
                if args[0] is first_input[0]:
                    first.append(name)
            if not wanted(name):
                return
            record(name, mod, args)
            stop.ran(name)
        return fn

    def record(name, mod, args):
        x = token_mask.layer_rows(mod, args[0].detach())
        # Layers reading the same tensor the same way (q/k/v, gate/up) share one product per call.
        rk = token_mask.rows_key(mod)
        key = next((i for i, (t, k, _) in enumerate(products) if t is args[0] and k == rk), None)
        if key is None:
            products.append((args[0], rk, gram_upper(x)))
            key = len(products) - 1
        if name not in sums:
            sums[name] = torch.zeros_like(products[key][2])
        sums[name] += products[key][2]
        sources[name].append((batch[0], key))
        counts[name] += x.shape[0]
        if reference is None or name in unpaired:
            return
        x = x.double()
        xf = float_x[name].pop(0) if float_x[name] else None
        if xf is None or xf.shape != x.shape:
            unpaired.add(name)
            crosses.pop(name, None)
        else:
            if name not in crosses:
                crosses[name] = torch.zeros_like(sums[name])
            crosses[name].addmm_(xf.T, x)

    sums_seen = [False]
    products: List[Tuple[torch.Tensor, tuple, torch.Tensor]] = []  # this call's inputs, rows_key and x^T x
    sources: Dict[str, List[Tuple[int, int]]] = {n: [] for n in targets}  # (batch, product) added
    batch = [0]
    stop = StopAtLastCall()
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    if reference is not None:
        handles += [reference.block.get_submodule(n).register_forward_hook(float_hook(n)) for n in targets]
    try:
        for i, inp in enumerate(inputs):
            batch[0] = i
            if reference is not None:
                run_block(reference.block, reference.inputs[i])
            stop.run(block, inp)
            if i == 0:
                stop.first_batch_done(n for n in targets if wanted(n))
            sums_seen[0] = True
            first_input.clear()
            products.clear()
            for n, left in float_x.items():
                if left and wanted(n) and n not in unpaired:  # the float block called it more often
                    unpaired.add(n)
                    crosses.pop(n, None)
                left.clear()
    finally:
        for h in handles:
            h.remove()
    for n in targets:
        if wanted(n) and counts[n] == 0:
            raise ValueError(f"layer '{n}' never ran on the calibration data, so it has no Hessian")
    shared: Dict[tuple, List[str]] = {}
    for n, h in sums.items():
        symmetric(h)
        h.mul_(2.0 / counts[n])  # in place: H is in_features^2, the largest object here
        if n in crosses:
            crosses[n].mul_(2.0 / counts[n])
        shared.setdefault(tuple(sources[n]), []).append(n)
    return Statistics(sums, crosses, first, [names for names in shared.values() if len(names) > 1])


def fit_float_outputs(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, lam: float = FIT_DAMP) -> torch.Tensor:
    """The float weight W' whose outputs on this layer's (quantized-model) inputs X best match
    the float model's outputs W X_f: argmin ||W X_f - W' X||^2 + lam' ||W - W'||^2 with
    lam' = lam * mean(diag H), i.e. W' = (W C + lam' W)(H + lam' I)^-1. Since the least-squares
    residual is orthogonal to X, GPTQ on (W', H) then minimizes ||W X_f - Q X||^2 itself.
    The ridge term keeps W' near W where the calibration tokens say little (H is often
    rank-deficient: fewer tokens than input channels)."""
    reg = lam * float(h.diagonal().mean())
    wd = w.double()
    rhs = wd @ cross.to(wd.device) + reg * wd
    del cross  # the caller hands it over: at most three in_features^2 matrices live at once
    a = h.clone()
    a.diagonal().add_(reg)
    factor, info = torch.linalg.cholesky_ex(a)
    del a
    if int(info) != 0:  # only if H holds NaN/Inf (the ridge makes it positive definite): plain GPTQ
        return w
    return torch.cholesky_solve(rhs.T.contiguous(), factor).T.to(w.dtype)


def _solve_units(todo: List[str], shared: List[List[str]]) -> List[List[str]]:
    """todo's layers in order, those sharing one H (stats.shared) together."""
    units, seen = [], set()
    for name in todo:
        if name in seen:
            continue
        unit = next(([n for n in group if n in todo] for group in shared if name in group), [name])
        seen.update(unit)
        units.append(unit)
    return units


def gptq_block(spec: WeightSpec, act_order: bool = False, damp: float = DAMP, block_size: int = BLOCK_SIZE,
               sequential: bool = False):
    """The per-block step of the pipeline for these settings.

    sequential: quantize the block's layers in the order they run, one input group at a time
    (q/k/v, then o, ...), each later group's H measured with the earlier groups already
    quantized, so it compensates their errors too (GPTQ's "true sequential" mode). Otherwise
    every H comes from the float block, in one pass (the default: on the tiny LM sequential
    gave INT4 +0.0127 vs +0.0182 perplexity but INT3 +0.0551 vs +0.0464, MiniLM INT4 the
    same cosine, at twice the time).
    When the pipeline passes a FloatReference, each layer's weight is first refit to the float
    model's outputs (fit_float_outputs) and the layers go sequentially, whatever `sequential`
    says: refitting every layer against the float block's inputs at once would correct the
    same upstream error once per layer (MiniLM INT4: cosine 0.9089-0.9806 instead of 0.9871).
    """

    def quantize_block(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs, edits: Edits,
                       reference: Optional[FloatReference] = None):
        new = {}
        remaining = dict(targets)
        one_group_at_a_time = sequential or reference is not None
        while remaining:
            stats = accumulate_hessians(block, remaining, inputs, reference, first_only=one_group_at_a_time)
            todo = stats.first if one_group_at_a_time and stats.first else list(remaining)
            for names in _solve_units(todo, stats.shared):
                lins = [remaining.pop(n) for n in names]
                h = stats.hessians.pop(names[0])
                for n in names[1:]:
                    del stats.hessians[n]
                ws, fitted = [], []
                for n, lin in zip(names, lins):
                    fitted.append(n in stats.crosses)
                    w = lin.weight.detach()
                    ws.append(fit_float_outputs(w, h, stats.crosses.pop(n)) if fitted[-1] else w)
                # Layers with the same H share one solve (rows are independent given H): one
                # damped inverse-Hessian factor instead of one per layer.
                with errors_named(f"layer {', '.join(repr(n) for n in names)}" if any(names) else ""):
                    res = C.gptq_quantize(ws[0] if len(ws) == 1 else torch.cat(ws), h, spec.bits, spec.symmetric,
                                          spec.group_for(lins[0].in_features), block_size, act_order, damp)
                row = 0
                for n, lin, fit in zip(names, lins, fitted):
                    rows = slice(row, row + lin.out_features)
                    row += lin.out_features
                    codes, scales, zps = (t[rows].clone() if len(names) > 1 else t  # no shared storage
                                          for t in (res.codes, res.scales, res.zero_points))
                    if res.damp_used > damp:
                        warn_damping(n, damp, res.damp_used)
                    note = (" act-order" if act_order else "") + (" float-fit" if fit else "")
                    new[n] = (make_layer(lin, codes, scales, zps, spec),
                              f"{spec.describe(lin.in_features)} gptq{note}")
                    if one_group_at_a_time and remaining and n:
                        set_submodule(block, n, new[n][0], edits)  # later groups see it quantized
            del stats
        return new

    return quantize_block


def quantize_gptq(model: nn.Module, spec: WeightSpec, forward_loop, cfg=None, act_order: bool = False,
                  damp: float = DAMP, block_size: int = BLOCK_SIZE, sequential: bool = False,
                  fit_float: bool = False, progress: bool = True):
    """GPTQ with explicit settings (also used to simulate bit widths the format table lacks).
    fit_float: every layer fits the float model's outputs (see fit_float_outputs)."""
    from ..config import LayerFilter

    cfg = cfg if cfg is not None else LayerFilter()
    return calibrate_blockwise(model, cfg, forward_loop, spec, gptq_block(spec, act_order, damp, block_size, sequential),
                               lambda c, n, m: check_linear(SimpleNamespace(group_size=spec.group_size), n, m),
                               "gptq",
                               feed_quantized=True, progress=progress, float_reference=fit_float)


@register_algorithm("gptq", "second-order error compensation (GPTQ)")
def apply_gptq(model: nn.Module, cfg, forward_loop=None, progress: bool = True):
    spec = WeightSpec(cfg.bits, cfg.symmetric, cfg.group_size, cfg.backend)
    return quantize_gptq(model, spec, forward_loop, cfg, act_order=getattr(cfg, "act_order", False),
                         damp=getattr(cfg, "damp", DAMP), block_size=getattr(cfg, "block_size", BLOCK_SIZE),
                         fit_float=getattr(cfg, "fit_float_outputs", False), progress=progress)


register_transform(GPTQ)(apply_weight_only)  # ts.GPTQ(act_order=True, ...) dispatches like IntWeightOnly
