"""The convolution part of W8A8 / Int8Dynamic: every selected nn.Conv1d / nn.Conv2d becomes an
Int8Conv1d / Int8Conv2d, with a BatchNorm that only reads the conv's output folded into it.

Steps (nothing in the model changes before the last one):
 1. one calibration pass (static, or dynamic when data is given): the activation range of
    each conv's input (the config's observer) and, on the first batch, which BatchNorm reads
    which conv's output;
 2. folds checked on that batch: the model with the folds must give the same output (a conv
    output also read elsewhere, e.g. by a residual, makes it differ and the fold is dropped);
 3. build every Int8Conv from the (folded) float weights, then swap them and the folded
    BatchNorms (FoldedBatchNorm) in;
 4. fuse the ReLU / residual add that follows a conv into its kernel (conv_epilogue.py).
"""
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import W8A8
from ..nn.int8_conv import FoldedBatchNorm, Int8Conv1d, Int8Conv2d, symmetric_padding
from ..report import LayerChange, Report, module_bytes
from ..transforms import _set_submodule, _tied_to_embedding, filter_reason, replace_modules
from .calibrate import NEVER_RAN, UNREACHED_NOTE, Reach, check_reached, require_forward_loop
from .conv_epilogue import fuse_conv_epilogues
from .observers import Observer
from .smoothquant import ProducerTrace, _run, outputs_match

CONVS = {nn.Conv1d: Int8Conv1d, nn.Conv2d: Int8Conv2d}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def check_conv(name: str, mod: nn.Module) -> Optional[str]:
    """Why the int8 convolution cannot take this conv (None: it can)."""
    if mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r}: the int8 convolution pads with zeros only"
    try:
        symmetric_padding(mod)
    except ValueError as e:
        return str(e)
    if not mod.weight.dtype.is_floating_point:
        return f"weight dtype {mod.weight.dtype} is not a float type"
    if mod.weight.device.type != "cpu":
        return f"weight is on {mod.weight.device}; the int8 convolution runs on the CPU"
    return None


def _targets(model: nn.Module, cfg) -> Dict[str, nn.Module]:
    tied = _tied_to_embedding(model)
    return {n: m for n, m in model.named_modules()
            if n and type(m) in CONVS and not (filter_reason(n, m, cfg, tied) or check_conv(n, m))}


def _folded(conv: nn.Module, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by bn in eval mode: bn(y) = y * g + (beta - mean * g)."""
    g = bn.weight.detach().float() if bn.weight is not None else torch.ones(bn.num_features)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros(bn.num_features)
    g = g / torch.sqrt(bn.running_var.float() + bn.eps)
    w = conv.weight.detach().float() * g.reshape((-1,) + (1,) * (conv.weight.dim() - 1))
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
    return w, (b - bn.running_mean.float()) * g + beta


def _bn_candidates(model, targets, trace) -> Dict[str, str]:
    """{conv name: BatchNorm name} where the BatchNorm's input is that conv's output."""
    if trace is None:
        return {}
    out = {}
    for names, producer in trace.groups():
        if len(names) == 1 and producer in targets and producer not in out:
            bn = trace.traced[names[0]]
            if bn.num_features == targets[producer].out_channels and bn.track_running_stats:
                out[producer] = names[0]
    return out


@torch.no_grad()
def _folds_hold(model, trace, targets, pairs: Dict[str, str]) -> bool:
    """Whether the model with these folds (float) gives the first batch's output to 1e-4 (to
    8 steps of a half model's precision)."""
    ref = _run(model, trace.batch)
    modules = dict(model.named_modules())
    swapped = []
    try:
        for conv_name, bn_name in pairs.items():
            conv = targets[conv_name]
            w, b = _folded(conv, modules[bn_name])
            new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.groups, True, device=conv.weight.device, dtype=conv.weight.dtype)
            new.weight.copy_(w)
            new.bias.copy_(b)
            for name, m in ((conv_name, new), (bn_name, nn.Identity())):
                swapped.append((name, modules[name]))
                _set_submodule(model, name, m)
        got = _run(model, trace.batch)
    finally:
        for name, old in reversed(swapped):
            _set_submodule(model, name, old)
    # a half model rounds the folded weights to its precision: a few of its steps apart is a match
    dtype = next(iter(targets.values())).weight.dtype if targets else torch.float32
    return outputs_match(ref, got, max(1e-4, 8 * torch.finfo(dtype).eps), 1e-6)


def _check_folds(model, trace, targets, pairs: Dict[str, str]) -> Dict[str, str]:
    """The folds that keep the output: all at once when they do (the usual case), else one by one."""
    if not pairs or _folds_hold(model, trace, targets, pairs):
        return pairs
    return {c: b for c, b in pairs.items() if _folds_hold(model, trace, targets, {c: b})}


def _calibrate(model, targets, loop, cfg, static: bool):
    obs = {n: Observer(cfg.observer, "tensor", percentile=cfg.percentile, symmetric=cfg.act_symmetric)
           if static else None for n in targets}

    def hook(name):
        def fn(mod, args):
            if obs[name] is None:
                return
            try:
                obs[name].update(args[0])
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer '{name}' ({type(mod).__name__}): calibration input: {e}") from None
        return fn

    norms = {n: m for n, m in model.named_modules() if isinstance(m, _NORMS)}
    # the first batch is kept also without BatchNorms (or in training mode, where none is
    # folded): fusing conv epilogues is checked on it
    trace = ProducerTrace(model, {} if model.training else norms)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        with trace:
            loop(model)
    finally:
        for h in handles:
            h.remove()
    return obs, trace


def apply_conv_int8(model: nn.Module, cfg, forward_loop=None, progress: bool = True) -> Tuple[Report, Reach]:
    """Quantize the convs `cfg` (W8A8 or Int8Dynamic) selects; returns their rows of the Report
    (convs quantized or skipped, BatchNorms folded or not) and which of them a static
    calibration never ran (the linear pass warns, or raises where nothing at all ran)."""
    static = isinstance(cfg, W8A8)
    targets = _targets(model, cfg)
    obs, trace, folds, cands, missed = {}, None, {}, {}, []
    if targets and (static or forward_loop is not None):
        loop = require_forward_loop(forward_loop, "W8A8") if static else forward_loop
        obs, trace = _calibrate(model, targets, loop, cfg, static)
        if static:
            missed = [n for n, o in obs.items() if o.max is None]
            if cfg.unreached == "error":
                check_reached(missed)
        if trace.batch is not None and not model.training:
            cands = _bn_candidates(model, targets, trace)
            folds = _check_folds(model, trace, targets, cands)
    modules = dict(model.named_modules())
    built, fallback = {}, cfg.unreached == "fallback"
    for n, m in targets.items():
        if n in missed and not fallback:
            continue
        w, b = _folded(m, modules[folds[n]]) if n in folds else (m.weight, m.bias)
        layer_static = static and n not in missed  # an unreached conv's fallback: per-call scales
        scale, zp = obs[n].qparams(symmetric=False) if layer_static else (None, 0)
        try:
            built[n] = CONVS[type(m)].from_float(m, w, b, "static" if layer_static else "dynamic", scale, zp,
                                                 folds.get(n, ""))
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer '{n}' ({type(m).__name__}): {e}") from e

    def convert(name, mod):
        return built[name], built[name].describe() + (f" ({UNREACHED_NOTE})" if name in missed else "")

    def check(name, mod):
        return check_conv(name, mod) or (NEVER_RAN if name in missed and not fallback else None)

    report = replace_modules(model, cfg, tuple(CONVS), convert, check, progress, desc="int8 conv")
    report.changes = [c for c in report.changes if c.action != "skipped" or c.module_type in ("Conv1d", "Conv2d")]
    for c in report.changes:
        if c.name in folds:
            c.reason = f"BatchNorm {folds[c.name]} folded in"
    for conv_name, bn_name in folds.items():
        bn = modules[bn_name]
        new = FoldedBatchNorm(bn.num_features, conv_name, type(bn).__name__)
        _set_submodule(model, bn_name, new)
        report.changes.append(LayerChange(bn_name, type(bn).__name__, "folded", "folded", module_bytes(bn), 0,
                                          f"folded into {conv_name}"))
    for conv_name, bn_name in cands.items():
        if conv_name not in folds:
            report.changes.append(LayerChange(bn_name, type(modules[bn_name]).__name__, "skipped", None,
                                              module_bytes(modules[bn_name]),
                                              reason=f"BatchNorm not folded: the output of {conv_name} is also "
                                                     f"read elsewhere"))
    batch = trace.batch if trace is not None else None
    fused = fuse_conv_epilogues(model, (lambda m: _run(m, batch)) if batch is not None else None)
    for c in report.changes:
        if c.name in fused:
            c.reason = "; ".join(filter(None, [c.reason, f"{fused[c.name]} fused"]))
    if targets and not folds:
        why = _why_not_folded(model, static, forward_loop)
        for n, m in modules.items():
            if isinstance(m, _NORMS) and why:
                report.changes.append(LayerChange(n, type(m).__name__, "skipped", None, module_bytes(m), reason=why))
    return report, Reach(len(targets) if static else 0, missed)


def _why_not_folded(model, static, forward_loop) -> str:
    if model.training:
        return "BatchNorm not folded: the model is in training mode (call model.eval() before quantizing)"
    if not static and forward_loop is None:
        return "BatchNorm not folded: pass calib_data to fold it (conv -> BatchNorm pairs are found by running the model)"
    return ""
