"""`ts.factorize(model, config)`: low-rank factorization of linear and convolution layers.

SVD for nn.Linear (plain, ASVD, SVD-LLM), Tucker-2 or CP for nn.Conv2d. A layer is replaced
only where the factors cost fewer parameters and FLOPs than the original; every other layer
is reported as skipped with the reason. Nothing changes in the model if any layer fails.
"""
from typing import Callable, Iterable, Optional

from torch import nn

from ..layer_views import linear_views
from ..hf import record_layers
from ..pruning import masks
from ..quantization.calibrate import UNREACHED_NOTE, make_forward_loop
from ..report import Report, compressed_layers, note_already_compressed, remember_skipped, warn_if_nothing_changed
from ..transforms import check_not_a_single_layer, replace_modules
from .config import CP, SVD, Tucker
from .conv import plan_convs
from .linear import plan_linears
from .select import candidates, factor_parents, skip_check


def factorize(model: nn.Module, config, calib_data: Optional[Iterable] = None, *,
              forward_loop: Optional[Callable[[nn.Module], None]] = None,
              progress: bool = True) -> Report:
    """Factorize `model` in place with ts.SVD, ts.Tucker or ts.CP; returns a Report whose rows
    give each layer's rank, kept energy, relative reconstruction error and FLOPs before/after.

    calib_data / forward_loop feed the activation statistics of SVD(method="asvd" | "svd_llm").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_not_a_single_layer(model, "ts.factorize")
    if not isinstance(config, (SVD, Tucker, CP)):
        raise TypeError(f"factorize takes ts.SVD, ts.Tucker or ts.CP, got {type(config).__name__}")
    loop = make_forward_loop(calib_data, forward_loop, progress)
    before = compressed_layers(model)  # rows saying why they stayed as they were
    masks.reapply(model)  # pruned layers compress as their forward computes
    every_token = loop is not None and getattr(config, "calibrate_all_experts", False)
    # Conv1D, nn.MultiheadAttention, subclasses, fused experts: as nn.Linear (the experts on every
    # token while calibrating where the config asks)
    with linear_views(model, every_token=every_token) as views:
        report = views.finish(_factorize(model, config, loop, progress))
    record_layers(model)  # transformers models: save_pretrained's config.json describes the layers
    report = note_already_compressed(views.name_rows(report), before)
    return warn_if_nothing_changed(report, "ts.factorize")


def _factorize(model: nn.Module, config, loop, progress: bool) -> Report:
    kind = nn.Linear if isinstance(config, SVD) else nn.Conv2d
    layers = candidates(model, config, kind)
    if isinstance(config, SVD):
        plans = plan_linears(model, config, layers, loop, progress)
    else:
        plans = plan_convs(config, layers, progress)

    def convert(name, mod):
        new = plans[name][1]
        return new, new.describe()

    report = replace_modules(model, config, (kind,), convert, skip_check(plans, factor_parents(model)),
                             progress=False, desc="factorizing")
    for row in report.changes:
        if row.action != "skipped":
            new = plans[row.name][1]
            row.action, row.reason = new.action, new.note()
            if isinstance(config, SVD) and new.method != config.method:  # unreached="fallback"
                row.reason += f"; {UNREACHED_NOTE}: plain SVD"
    remember_skipped(model, report)
    return report


__all__ = ["factorize", "SVD", "Tucker", "CP"]
