"""`ts.quantize(model, config)`: one verb for every quantization technique."""
from typing import Callable, Iterable, Optional

from torch import nn

from ..config import resolve_config
from ..layer_views import linear_views
from ..hf import record_layers
from ..pruning import masks
from ..report import Report, compressed_layers, note_already_compressed, warn_if_nothing_changed
from ..transforms import check_no_empty_layers, check_not_a_single_layer
# Each technique module registers its transforms (or weight-only algorithms) on import.
from . import awq, binary, gptq, lowbit, w4a8, w8a8, weight_only  # noqa: F401
from .calibrate import make_forward_loop
from .registry import TRANSFORMS


def quantize(model: nn.Module, config, calib_data: Optional[Iterable] = None, *,
             forward_loop: Optional[Callable[[nn.Module], None]] = None,
             progress: bool = True) -> Report:
    """Quantize `model` in place with `config` (a config object or a preset name).

    calib_data (an iterable of model inputs: tensors, tuples or dicts) or forward_loop
    (a callable run as forward_loop(model)) feed calibration for techniques that need it;
    weight-only round-to-nearest does not. Returns a Report of what changed and what was
    skipped. transformers' Conv1D layers (GPT-2) are quantized as the nn.Linear they are.
    Warns (UserWarning) when nothing was quantized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: expected a torch.nn.Module, got {type(model).__name__}")
    check_not_a_single_layer(model, "ts.quantize")
    cfg = resolve_config(config)
    transform = TRANSFORMS.get(type(cfg))
    if transform is None:
        raise TypeError(f"{type(cfg).__name__} is not a quantization config")
    loop = make_forward_loop(calib_data, forward_loop, progress)
    masks.reapply(model)  # pruned layers compress as their forward computes
    every_token = loop is not None and getattr(cfg, "calibrate_all_experts", False)
    # Conv1D, nn.MultiheadAttention, subclasses, fused experts: as nn.Linear (the experts on every
    # token while calibrating where the config asks)
    with linear_views(model, every_token=every_token) as views:
        check_no_empty_layers(model, cfg)
        before = compressed_layers(model)
        report = views.finish(note_already_compressed(transform(model, cfg, forward_loop=loop, progress=progress),
                                                      before))
    record_layers(model)  # transformers models: save_pretrained's config.json describes the layers
    return warn_if_nothing_changed(views.name_rows(report), "ts.quantize")


__all__ = ["quantize"]
