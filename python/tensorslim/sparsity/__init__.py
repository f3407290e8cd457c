"""`ts.sparsify(model, config)`: sparse layers that store only their kept weights and run a
kernel that skips the zeros.

    ts.sparsify(model, ts.NM(2, 4))                                   # 2:4 by magnitude
    ts.sparsify(model, ts.NM(2, 4, method="wanda"), calib_data=batches)
    ts.sparsify(model, ts.Unstructured(0.9, method="sparsegpt", values="int8"), calib_data=batches)
    ts.sparsify(model, ts.SparseStorage())                            # zeros from ts.prune, as they are
    ts.sparsify(model, ts.NM(2, 4, method="sparsegpt", store="masks"), calib_data=batches)  # fine-tune, then
    ts.sparsify(model, ts.SparseStorage())                            # ... store the n:m zeros sparse

Linear layers, and transformers' Conv1D (GPT-2) as the nn.Linear it is, become NMSparseLinear /
CSRSparseLinear; nn.Conv2d / nn.Conv1d (zero padding) become NMSparseConv2d /
CSRSparseConv2d (NMSparseConv1d / CSRSparseConv1d), Wanda and SparseGPT calibrating them on
their input patches (grouped convs group by group); any other layer holding a weight matrix
is reported as skipped. On any error
the model is left exactly as it was.
"""
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..layer_views import linear_views
from ..nn.sparse_conv import conv_supported
from ..hf import record_layers
from ..pruning import masks as pruning_masks
from ..quantization.calibrate import make_forward_loop
from ..report import (Report, compressed_layers, module_bytes, note_already_compressed, remember_skipped,
                      warn_if_nothing_changed)
from ..transforms import check_no_empty_layers, check_not_a_single_layer, replace_modules
from .config import NM, SparseStorage, Unstructured, _Sparse
from .as_masks import restore_masked
from .uncalibrated import magnitude_layer, storage_layer

CSR_MAX_COLUMNS = 65536  # 16-bit column offsets


def _check(cfg, conv1d_names: set):
    def check(name: str, mod: nn.Module) -> Optional[str]:
        if mod.weight.device.type == "meta":
            return "weight is on the meta device (no data to rank)"
        # Checked while layers are chosen, before any work: calibration would otherwise meet
        # the NaN deep in a block, where the error could no longer name the layer.
        if not torch.isfinite(mod.weight).all():
            kind = "Conv1D" if name in conv1d_names else type(mod).__name__
            raise ValueError(f"layer '{name}' ({kind}): weight contains NaN or Inf; it cannot be ranked or "
                             "stored sparse")
        conv = isinstance(mod, (nn.Conv1d, nn.Conv2d))
        if conv and (why := conv_supported(mod)):
            return why
        # the stored matrix's columns: in_features, or a conv's in_channels / groups * kernel size
        width, what = (mod.weight[0].numel(), "in_channels / groups * kernel size") if conv else \
            (mod.in_features, "in_features")
        if getattr(cfg, "layout", "") == "csr" and width > CSR_MAX_COLUMNS:
            return f"{what} {width} > {CSR_MAX_COLUMNS} does not fit CSR's 16-bit column offsets"
        return None
    return check


def sparsify(model: nn.Module, config, calib_data: Optional[Iterable] = None, *,
             forward_loop: Optional[Callable[[nn.Module], None]] = None, progress: bool = True) -> Report:
    """Sparsify `model` in place with ts.NM, ts.Unstructured or ts.SparseStorage; returns a Report
    with each layer's pattern and bytes before / after. Wanda and SparseGPT need calib_data (an
    iterable of model inputs) or forward_loop(model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: expected a torch.nn.Module, got {type(model).__name__}")
    check_not_a_single_layer(model, "ts.sparsify")
    if not isinstance(config, (_Sparse, SparseStorage)):
        raise TypeError(f"sparsify takes ts.NM, ts.Unstructured or ts.SparseStorage, got {type(config).__name__}")
    loop = None
    if isinstance(config, _Sparse) and config.needs_data:
        if calib_data is None and forward_loop is None:
            why = f"method={config.method!r}" if config.method != "magnitude" else \
                "bias_correction=True" if config.bias_correction else "profile='owl'"
            raise ValueError(f"sparsify: {why} needs calibration data: pass calib_data= "
                             f"(an iterable of model inputs) or forward_loop=")
        loop = make_forward_loop(calib_data, forward_loop, progress)
    pruning_masks.reapply(model)  # pruned layers compress as their forward computes
    every_token = loop is not None and getattr(config, "calibrate_all_experts", False)
    masks = getattr(config, "store", "sparse") == "masks"
    originals = dict(model.named_modules()) if masks else {}
    # Conv1D, nn.MultiheadAttention, subclasses, fused experts: as nn.Linear (the experts on every
    # token while calibrating where the config asks). Masks hold a module's `weight`: with
    # store="masks" attention's packed projections and fused experts stay as they are (skipped).
    with linear_views(model, attention=not masks, every_token=every_token) as views:
        check_no_empty_layers(model, config)
        already = compressed_layers(model)
        report = views.finish(note_already_compressed(_sparsify(model, config, loop, progress, views.conv1d_names),
                                                      already))
    if masks:
        report = restore_masked(model, report, originals)
    record_layers(model)  # transformers models: save_pretrained's config.json describes the layers
    return warn_if_nothing_changed(views.name_rows(report), "ts.sparsify")


def _sparsify(model: nn.Module, config, loop, progress: bool, conv1d_names: set) -> Report:
    check = _check(config, conv1d_names)
    owl = None
    if loop is not None and getattr(config, "profile", "uniform") == "owl":
        from .calibrated import LAYER_TYPES
        from .owl import layer_sparsities

        owl = layer_sparsities(model, config, loop, lambda c, n, m: check(n, m), LAYER_TYPES)
    if loop is not None and (config.method != "magnitude" or config.bias_correction):
        from .calibrated import sparsify_calibrated

        return sparsify_calibrated(model, config, loop, lambda c, n, m: check(n, m), progress, owl)
    # data-free (magnitude under OWL too, once the data gave each layer its sparsity): calib_data
    # is otherwise accepted and unused, as ts.prune does (recipes pass it to every step)
    if isinstance(config, SparseStorage):
        check, convert = _storage_steps(config, check)
    else:
        def convert(name, mod):
            return magnitude_layer(name, mod, config, None if owl is None else owl[mod])
    report = replace_modules(model, config, (nn.Linear, nn.Conv1d, nn.Conv2d), convert, check, progress=progress,
                             desc="sparsifying")
    for row in report.changes:
        if row.action != "skipped":
            row.action = "sparsified"
    remember_skipped(model, report)
    return report


def _storage_steps(config: SparseStorage, check):
    """SparseStorage's (check, convert): each layer is built while layers are chosen, and one whose
    zeros are too few for its sparse form to be smaller than its dense weight (a layer ts.prune
    left out, or a half model's layer stored with float32 CSR values) stays dense, with why."""
    built = {}

    def storage_check(name: str, mod: nn.Module) -> Optional[str]:
        reason = check(name, mod)
        if reason:
            return reason
        try:
            new, fmt = storage_layer(name, mod, config)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer '{name}' ({type(mod).__name__}): {e}") from e
        dense, sparse = module_bytes(mod), module_bytes(new)
        if sparse >= dense:
            zeros = float((mod.weight == 0).sum()) / max(1, mod.weight.numel())
            return (f"{zeros:.1%} zeros: stored sparse ({fmt.split(' (')[0]}) it would take {sparse} bytes, "
                    f"not fewer than the dense layer's {dense}")
        built[name] = (new, fmt)
        return None

    return storage_check, lambda name, mod: built.pop(name)


__all__ = ["sparsify", "NM", "Unstructured", "SparseStorage"]
