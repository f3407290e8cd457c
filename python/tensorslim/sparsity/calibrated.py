"""Wanda and SparseGPT, block by block on the calibration pipeline GPTQ uses
(quantization/blockwise.py): each block's layers are pruned from statistics of their inputs,
and the next block is calibrated on the pruned block's outputs.

Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2 (the input feature's L2 norm over the
calibration tokens), compared within each output row (unstructured) or each group of m (n:m);
no weight update. A convolution's input features are its input patches' entries (channel,
kernel row, kernel column: token_mask.layer_rows), one row per output position; a grouped
conv's output channels are scored (Wanda) or pruned (SparseGPT, against H's diagonal block)
group by group, each on its own channels' entries.
SparseGPT (Frantar & Alistarh, 2023): H = 2/n * sum x x^T per layer, then the C++ column
sweep (ops.sparsegpt) chooses the mask and updates the kept weights to compensate. Joint
sparse + quantized (values "int8" / "int4"): a float sweep first, whose kept weights set each
row's grid (max |kept| / qmax), then the sweep again rounding to that grid, so the compensation
covers the rounding. The grid of the original row's largest weight clipped the kept weights the
updates had grown (2:4 of nn.Linear-initialized layers: ~1.5x past it), and that sweep came out
worse than the float sweep rounded afterwards (tests/python/test_sparsify.py).
"""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..ops import sparsegpt as S
from ..quantization.blockwise import Edits, Inputs, StopAtLastCall, calibrate_blockwise, errors_named, warn_damping
from ..quantization import token_mask
from ..quantization.gptq import accumulate_hessians
from .build import build_layer, dense_linear
from .config import NM, _Sparse
from .masks import nm_keep, row_keep
from .uncalibrated import magnitude_keep

LayerSparsity = Optional[Dict[nn.Module, float]]  # profile "owl": each layer's own sparsity


def square_sum_hook(sums: Dict[str, torch.Tensor], name: str, after: Callable[[str], None] = lambda name: None,
                    plain: Optional[Dict[str, list]] = None):
    """A forward pre-hook adding the squares of the layer's input rows (token_mask.layer_rows:
    a conv's patches) per column into sums[name] (float64), then calling after(name); plain:
    also [sum of the rows, their count] into plain[name] (for means)."""
    def fn(mod, args):
        x = token_mask.layer_rows(mod, args[0].detach()).double()
        sums[name] += (x * x).sum(0).cpu()
        if plain is not None:
            plain[name][0] += x.sum(0).cpu()
            plain[name][1] += x.shape[0]
        after(name)
    return fn


def zero_sums(layers: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    return {n: torch.zeros(_patch_width(m), dtype=torch.float64) for n, m in layers.items()}


def norms_from_sums(sums: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """||X_j||_2 per column from the square sums; a NaN norm would rank nothing (kept or dropped
    by comparison order), so non-finite activations raise naming the layer."""
    for n, s in sums.items():
        if not torch.isfinite(s).all():
            raise ValueError(f"layer '{n}': its calibration inputs contain NaN or Inf; Wanda's scores need "
                             f"finite activations")
    return {n: s.sqrt() for n, s in sums.items()}


def _input_stats(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs, with_means: bool
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(||X_j||_2, and with_means the mean of X_j) per input feature of each target over the
    block's calibration tokens (float64)."""
    sums = zero_sums(targets)
    plain = {n: [0.0, 0] for n in targets} if with_means else None
    stop = StopAtLastCall()  # the block's output is not used
    handles = [m.register_forward_pre_hook(square_sum_hook(sums, n, stop.ran, plain)) for n, m in targets.items()]
    try:
        for i, inp in enumerate(inputs):
            stop.run(block, inp)
            if i == 0:
                stop.first_batch_done(targets)
    finally:
        for h in handles:
            h.remove()
    means = {n: total / max(count, 1) for n, (total, count) in plain.items()} if with_means else {}
    return norms_from_sums(sums), means


def corrected_bias(layer: nn.Module, w: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The layer's bias (zeros without one) plus what its pruned weights contributed on average,
    (W * ~keep) @ mean(x) (a grouped conv's rows against their group's columns), float32."""
    dropped = w.detach().double().cpu() * (~keep.cpu())
    delta = torch.cat([dropped[r] @ mean[c] for r, c in _groups(layer)])
    own = layer.bias.detach().double().cpu() if layer.bias is not None else torch.zeros_like(delta)
    return (own + delta).float().to(w.device)


def wanda_score(layer: nn.Module, w: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (float64, on the CPU) of the layer's [out, columns] weight w; a grouped
    conv's rows against their own group's columns."""
    return torch.cat([w[r].abs().double().cpu() * norms[None, c] for r, c in _groups(layer)])


def _patch_width(layer: nn.Module) -> int:
    """Columns of token_mask.layer_rows for the layer: a grouped conv's patches span every group."""
    return layer.weight[0].numel() * getattr(layer, "groups", 1)


def _groups(layer: nn.Module):
    """(rows, columns of the layer's statistics) per group of a grouped conv: output channels
    [q * N/g, (q+1) * N/g) read only group q's patch entries. One group for the others."""
    g = getattr(layer, "groups", 1)
    rows, cols = layer.weight.shape[0] // g, layer.weight[0].numel()
    return [(slice(q * rows, (q + 1) * rows), slice(q * cols, (q + 1) * cols)) for q in range(g)]


def _layout(cfg: _Sparse):
    return ("nm", cfg.n, cfg.m) if isinstance(cfg, NM) else ("csr", 0, 0)


def _sparsity(cfg: _Sparse, owl: LayerSparsity, layer: nn.Module) -> Tuple[float, str]:
    """(sparsity, description) of the layer: its OWL sparsity where the profile gave one."""
    if owl is None:
        return getattr(cfg, "sparsity", 0.0), cfg.describe()
    return owl[layer], cfg.describe(owl[layer])


def scored_block(cfg: _Sparse, owl: LayerSparsity):
    """Wanda (or magnitude, with bias correction: the pruned block's inputs give its means)."""
    layout, n, m = _layout(cfg)

    def prune_block(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs, edits: Edits):
        norms, means = _input_stats(block, targets, inputs, cfg.bias_correction)
        new = {}
        for name, lin in targets.items():
            w, _ = dense_linear(lin)
            sparsity, what = _sparsity(cfg, owl, lin)
            if cfg.method == "wanda":
                score = wanda_score(lin, w, norms[name])
                keep = (nm_keep(score, n, m) if layout == "nm" else row_keep(score, sparsity)).to(w.device)
            else:
                keep = magnitude_keep(w, cfg, sparsity)
            bias = corrected_bias(lin, w, keep, means[name]) if cfg.bias_correction else None
            mod = build_layer(layout, lin, keep, cfg.values, cfg.backend, n, m, bias=bias)
            new[name] = (mod, f"{what} {mod.values_dtype}" + (" bias-corrected" if bias is not None else ""))
        return new

    return prune_block


def sparsegpt_block(cfg: _Sparse, owl: LayerSparsity):
    layout, n, m = _layout(cfg)
    bits = {"int8": 8, "int4": 4}.get(cfg.values, 0)  # joint: kept weights rounded inside the sweep

    def prune_block(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs, edits: Edits):
        stats = accumulate_hessians(block, targets, inputs)
        new = {}
        for name, lin in targets.items():
            w, _ = dense_linear(lin)
            h = stats.hessians.pop(name)
            sparsity, what = _sparsity(cfg, owl, lin)
            with errors_named(f"layer '{name}'" if name else ""):
                # a grouped conv: each group's rows against its own block of H
                parts = [_sweep(cfg, w[r], h[c, c], n, m, bits, sparsity) for r, c in _groups(lin)]
            damp_used = max(p.damp_used for p in parts)
            if damp_used > cfg.damp:
                warn_damping(name, cfg.damp, damp_used)
            weight = torch.cat([p.weight for p in parts]).to(device=w.device)
            keep = torch.cat([p.keep for p in parts]).to(w.device)
            scales = torch.cat([p.scales for p in parts]) if bits else None
            mod = build_layer(layout, lin, keep, cfg.values, cfg.backend, n, m, weight, scales)
            new[name] = (mod, f"{what} {mod.values_dtype}" + (" joint" if bits else ""))
        return new

    return prune_block


def _sweep(cfg: _Sparse, w: torch.Tensor, h: torch.Tensor, n: int, m: int, bits: int,
           sparsity: float) -> S.SparseGptResult:
    """SparseGPT on one weight; with bits, rounded to the grid of a float sweep's kept weights."""
    run = lambda b, scales=None: S.sparsegpt_prune(  # noqa: E731
        w, h, n, m, sparsity, b, cfg.block_size, cfg.damp,
        cfg.backend if cfg.backend == "reference" else "auto", scales)
    if not bits:
        return run(0)
    kept = run(0).weight
    return run(bits, kept.abs().amax(1) / (2 ** (bits - 1) - 1))


def sparsify_calibrated(model: nn.Module, cfg: _Sparse, forward_loop, check, progress: bool,
                        owl: LayerSparsity = None):
    """Wanda, SparseGPT, or magnitude with bias correction, block by block; owl: each layer's
    sparsity (profile "owl"), else cfg's."""
    step = sparsegpt_block(cfg, owl) if cfg.method == "sparsegpt" else scored_block(cfg, owl)
    layout, n, m = _layout(cfg)

    def outside(lin: nn.Module):  # a layer outside every block: magnitude, which needs no data
        w, _ = dense_linear(lin)
        sparsity, what = _sparsity(cfg, owl, lin)
        mod = build_layer(layout, lin, magnitude_keep(w, cfg, sparsity), cfg.values, cfg.backend, n, m)
        return mod, f"{what.replace(cfg.method, 'magnitude')} {mod.values_dtype}"

    return calibrate_blockwise(model, cfg, forward_loop, None, step, check, cfg.method, feed_quantized=True,
                               progress=progress, outside=outside, action="sparsified", layer_types=LAYER_TYPES)


LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # convs: statistics over their input patches

