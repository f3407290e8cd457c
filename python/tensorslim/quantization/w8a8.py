"""W8A8 (static, calibrated activation scales) and Int8Dynamic (per-token scales at run time),
with optional SmoothQuant. Every nn.Linear the filter selects becomes an Int8Linear.

Steps (nothing in the model changes before the last one):
 1. calibration pass: per-channel min/max of each layer's input, a bounded row sample for
    the alpha search, and (first batch) which module produced each input;
 2. smoothing factors per group of layers sharing an input (q/k/v share s), alpha fixed
    or searched; each group's s folded into its producer when fold_is_exact proves it,
    else kept as the Int8Linear's inv_smooth (fused into activation quantization);
 3. static only, observers other than max: a second pass observing the smoothed inputs;
 4. build every Int8Linear, then swap them in and write the folded producers' weights.
"""
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Int8Dynamic, W8A8
from ..nn import Int8Linear
from ..ops import torch_onednn
from ..report import Report, remember_skipped
from ..transforms import _tied_to_embedding, filter_reason, replace_modules, structure_restored_on_error
from .calibrate import NEVER_RAN, UNREACHED_NOTE, Reach, eval_mode, require_forward_loop, settle_unreached
from .conv_int8 import apply_conv_int8
from .observers import Observer, qparams_from_range
from . import token_mask
from .registry import register_transform
from .smoothquant import ProducerTrace, _run, fold_is_exact, foldable_kind, search_alpha, smooth_factors


def _check(name: str, mod: nn.Linear) -> Optional[str]:
    if not mod.weight.dtype.is_floating_point:
        return f"weight dtype {mod.weight.dtype} is not a float type"
    if mod.weight.device.type != "cpu":
        return f"weight is on {mod.weight.device}; the INT8 GEMM runs on the CPU"
    return None


def _targets(model: nn.Module, cfg) -> Dict[str, nn.Linear]:
    tied = _tied_to_embedding(model)
    return {n: m for n, m in model.named_modules()
            if n and type(m) is nn.Linear and not (filter_reason(n, m, cfg, tied) or _check(n, m))}


class _InputStats:
    """Per-channel min/max of a layer's input over the calibration data, plus a uniform random
    sample of up to `sample_rows` of its rows over all batches (for the alpha search): each row
    draws a random key and the rows with the smallest keys stay (bottom-k sampling). A quarter
    of each batch's rows, the rule before, left 225 rows of MiniLM's 903 real calibration tokens
    once padding was left out, and the search then chose alphas that gave an embedding cosine
    of 0.9547 (0.9982 with this sample)."""

    def __init__(self, name: str, in_features: int, sample_rows: int, seed: int):
        self.name, self.K, self.cap = name, in_features, sample_rows
        self.min = self.max = None
        self.sample: List[torch.Tensor] = []  # one tensor: the rows kept so far
        self.keys = torch.empty(0)
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"layer '{self.name}': expected a float input tensor, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.shape[-1] != self.K:
            raise ValueError(f"layer '{self.name}': input has {x.shape[-1]} features, expected {self.K}")
        rows = token_mask.rows(x.detach().float(), self.K)
        if rows.shape[0] == 0:
            return
        if not torch.isfinite(rows).all():
            raise ValueError(f"layer '{self.name}': calibration input contains NaN or Inf")
        lo, hi = rows.amin(0), rows.amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.cap:
            keys = torch.cat([self.keys, torch.rand(rows.shape[0], generator=self.gen)])
            pool = torch.cat(self.sample + [rows])
            self.keys, idx = torch.sort(keys)
            self.keys, idx = self.keys[:self.cap], idx[:self.cap]
            self.sample = [pool[idx.to(pool.device)].clone()]


def _calibrate(model, targets, loop, sample_rows: int, trace_structure: bool):
    stats = {n: _InputStats(n, m.in_features, sample_rows, i) for i, (n, m) in enumerate(targets.items())}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.update(args[0]))
               for n, m in targets.items()]
    trace = ProducerTrace(model, targets) if trace_structure else None
    try:
        if trace is not None:
            with trace:
                loop(model)
        else:
            loop(model)
    finally:
        for h in handles:
            h.remove()
    return stats, trace


def _observe_smoothed(model, targets, loop, inv: Dict[str, Optional[torch.Tensor]], cfg) -> Dict[str, Observer]:
    obs = {n: Observer(cfg.observer, "tensor", percentile=cfg.percentile, symmetric=cfg.act_symmetric)
           for n in targets}

    def hook(name):
        def fn(mod, args):
            x = token_mask.rows(args[0].detach().float(), mod.in_features)  # padded tokens left out
            obs[name].update(x * inv[name] if inv[name] is not None else x)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        loop(model)
    finally:
        for h in handles:
            h.remove()
    return obs


@register_transform(W8A8, Int8Dynamic)
def apply_w8a8(model: nn.Module, cfg, forward_loop=None, progress: bool = True):
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    with structure_restored_on_error(model):  # the convs go in first; a failing linear pass undoes them
        return _apply_w8a8(model, cfg, forward_loop, progress)


def _apply_w8a8(model: nn.Module, cfg, forward_loop, progress: bool):
    static = isinstance(cfg, W8A8)
    mode = "static" if static else "dynamic"
    technique = "W8A8" if static else "Int8Dynamic with smoothquant=True"
    conv_report, conv_reach = apply_conv_int8(model, cfg, forward_loop, progress)  # convs first: see conv_int8.py
    targets = _targets(model, cfg)
    # the model's own fp32 tensors (no copy: a whole model's linears twice at once), so every
    # smoothing / folding step below works out of place
    weights = {n: m.weight.detach().float() for n, m in targets.items()}
    biases = {n: m.bias for n, m in targets.items()}
    inv: Dict[str, Optional[torch.Tensor]] = {n: None for n in targets}  # kept in the module
    seen: Dict[str, Optional[torch.Tensor]] = {n: None for n in targets}  # 1/s, folded or not
    smooth_desc = {n: "none" for n in targets}
    norm_updates: Dict[str, Dict[str, torch.Tensor]] = {}  # producer name -> new weight / bias
    stats, missed, reached = None, [], targets
    if targets and (static or cfg.smoothquant):
        loop = require_forward_loop(forward_loop, technique)
        search = cfg.smoothquant and cfg.smoothquant_alpha == "auto"
        stats, trace = _calibrate(model, targets, loop, cfg.search_rows if search else 0,
                                  cfg.smoothquant and cfg.fold)
        missed = [n for n, s in stats.items() if s.min is None]
        reached = {n: m for n, m in targets.items() if n not in missed}
    # before any smoothing: unreached="error", or nothing reached at all, raises with no work wasted
    settle_unreached(cfg, technique, conv_reach, Reach(len(targets) if stats is not None else 0, missed))
    if stats is not None and cfg.smoothquant:
        with eval_mode(model):  # its reference and fold checks run the model: as inference does
            _smooth(model, cfg, reached, stats, trace, weights, biases, inv, seen, smooth_desc, norm_updates,
                    mode, search, progress)

    act = {}
    if static and targets:
        if cfg.observer == "max":  # exact from the per-channel statistics: min_j(x_j / s_j) etc.
            for n in reached:
                lo, hi = stats[n].min, stats[n].max
                if seen[n] is not None:  # the input the quantized layer will see: x / s
                    lo, hi = lo * seen[n], hi * seen[n]
                act[n] = tuple(int(v) if i else float(v) for i, v in enumerate(
                    qparams_from_range(lo.min(), hi.max(), cfg.act_symmetric)))
        else:
            obs = _observe_smoothed(model, reached, loop, seen, cfg)
            act = {n: obs[n].qparams() for n in reached}

    built, fallback = {}, cfg.unreached == "fallback"
    for n, m in targets.items():
        if n in missed and not fallback:
            continue
        scale, zp = act.get(n, (None, 0))
        layer_static = static and n not in missed  # an unreached layer's fallback: per-token scales
        try:
            built[n] = Int8Linear.from_float(weights[n], biases[n], "static" if layer_static else "dynamic",
                                             inv[n], scale, zp, act_signed=layer_static and cfg.act_symmetric,
                                             smooth=smooth_desc[n], backend=cfg.backend,
                                             weight_qmax=_weight_qmax(cfg, weights[n], layer_static))
        except (ValueError, TypeError) as e:  # e.g. a NaN weight: say which layer
            raise type(e)(f"layer '{n}' ({type(m).__name__}): {e}") from e

    def convert(name, mod):
        new = built[name]
        return new, new.describe() + (f" ({UNREACHED_NOTE})" if name in missed else "")

    def check(name, mod):
        return _check(name, mod) or (NEVER_RAN if name in missed and not fallback else None)

    report = replace_modules(model, cfg, (nn.Linear,), convert, check, progress,
                             desc="w8a8" if static else "int8 dynamic")
    with torch.no_grad():  # the swap succeeded: now the folded producers take their share of s
        modules = dict(model.named_modules())
        for pname, upd in norm_updates.items():
            for attr, value in upd.items():
                getattr(modules[pname], attr).copy_(value)
    return _merge(conv_report, report, model)


def _weight_qmax(cfg, weight: torch.Tensor, static: bool) -> int:
    """cfg.weight_qmax, or where None this CPU's choice for a weight of this shape; 127 for
    int8 (signed) activation codes, which torch's matmul route does not take."""
    if cfg.weight_qmax is not None:
        return cfg.weight_qmax
    if static and cfg.act_symmetric:
        return 127
    return torch_onednn.default_weight_qmax(weight.shape[1], weight.shape[0])


def _merge(conv_report: Report, report: Report, model: nn.Module) -> Report:
    """The conv rows, then the linear pass's rows (less its generic 'not supported' rows for
    layers the conv pass already explained)."""
    named = {c.name for c in conv_report.changes}
    merged = Report(conv_report.changes + [c for c in report.changes if c.name not in named])
    remember_skipped(model, merged)
    return merged


def _smooth(model, cfg, targets, stats, trace, weights, biases, inv, seen, smooth_desc, norm_updates, mode,
            search, progress=True):
    """Fills inv / smooth_desc / norm_updates and scales `weights` (working copies) by s."""
    if trace is not None and trace.groups():
        groups = trace.groups()
    else:
        groups = [([n], None) for n in targets]
    grouped = {n for names, _ in groups for n in names}
    groups += [([n], None) for n in targets if n not in grouped]
    modules = dict(model.named_modules())
    reference = _run(model, trace.batch) if trace is not None and trace.batch is not None else None
    for names, producer in tqdm(groups, desc="smoothquant", disable=not progress or len(groups) < 2,
                                leave=False):
        x_min = torch.stack([stats[n].min for n in names]).amin(0)
        x_max = torch.stack([stats[n].max for n in names]).amax(0)
        ws = [weights[n] for n in names]
        if search:
            sample = torch.cat([t for n in names for t in stats[n].sample])[: cfg.search_rows]
            n_steps = int(round(1 / cfg.alpha_grid_step))
            grid = [round(i / n_steps, 4) for i in range(n_steps + 1)]
            alpha, _ = search_alpha(sample, ws, x_min, x_max, mode,
                                    symmetric=getattr(cfg, "act_symmetric", False), grid=grid,
                                    weight_qmax=_weight_qmax(cfg, ws[0], mode == "static"))
        else:
            alpha = float(cfg.smoothquant_alpha)
        w_absmax = torch.stack([w.abs().amax(dim=0) for w in ws]).amax(dim=0)
        s = smooth_factors(torch.maximum(-x_min, x_max), w_absmax, alpha)
        for n in names:
            weights[n] = weights[n] * s[None, :]
        where = _try_fold(model, modules, producer, names, s, weights, biases, trace, reference,
                          norm_updates)
        for n in names:
            seen[n] = (1.0 / s).float()
            if where is None:
                inv[n] = (1.0 / s).float()
                smooth_desc[n] = f"input,a={alpha:.2f}"
            else:
                smooth_desc[n] = f"folded({where}),a={alpha:.2f}"


def _try_fold(model, modules, producer, names, s, weights, biases, trace, reference, norm_updates) -> Optional[str]:
    """Fold 1/s into the producer when that is exact; returns the producer's name or None."""
    if producer is None or trace is None or trace.batch is None or reference is None:
        return None
    pmod = modules.get(producer)
    kind = foldable_kind(pmod, s.shape[0]) if pmod is not None else None
    if kind is None or producer in norm_updates or producer in names:
        return None
    if not fold_is_exact(model, trace.batch, pmod, kind, [modules[n] for n in names], reference):
        return None
    if kind == "linear" and producer in weights:  # a quantized producer: scale its working rows
        weights[producer] = weights[producer] / s[:, None]
        if biases[producer] is not None:
            biases[producer] = biases[producer].detach().float() / s
        return producer
    upd = {"weight": (pmod.weight.detach().float() / (s[:, None] if kind == "linear" else s)).to(pmod.weight.dtype)}
    if getattr(pmod, "bias", None) is not None:
        upd["bias"] = (pmod.bias.detach().float() / s).to(pmod.bias.dtype)
    norm_updates[producer] = upd
    return producer
