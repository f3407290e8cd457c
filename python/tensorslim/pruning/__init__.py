"""`ts.prune(model, config)`: one verb for every pruning technique.

    ts.prune(model, ts.Magnitude(sparsity=0.8, scope="global"))
    ts.pruning.finalize(model)   # bake the masks in, remove the machinery
"""
from typing import Callable, Iterable, Optional

from torch import nn

from ..report import SUMMARY_SOURCES, Report, compressed_layers, note_already_compressed, warn_if_nothing_changed
from ..transforms import check_not_a_single_layer
from . import masks
from .config import ChannelPrune, Magnitude, RandomPrune, _Unstructured
from .masks import finalize
from ..quantization.calibrate import reusable
from .schedule import Schedule
from .unstructured import prune_unstructured

SUMMARY_SOURCES.append(masks.summary_rows)  # ts.summary: each pruned layer's sparsity


def _structured_rows(model):
    from .channels import summary_rows  # channels pulls in the calibration helpers: load lazily

    return summary_rows(model)


SUMMARY_SOURCES.append(_structured_rows)


def prune(model: nn.Module, config, calib_data: Optional[Iterable] = None, *,
          forward_loop: Optional[Callable[[nn.Module], None]] = None, progress: bool = True,
          **kwargs) -> Report:
    """Prune `model` in place with `config`; returns a Report of what changed and was skipped.
    On any error the model is left exactly as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune: expected a torch.nn.Module, got {type(model).__name__}")
    check_not_a_single_layer(model, "ts.prune")
    before = compressed_layers(model)  # rows saying why they stayed as they were
    if isinstance(config, _Unstructured):
        if kwargs:
            raise TypeError(f"prune: unexpected arguments {sorted(kwargs)} for {type(config).__name__}")
        report = prune_unstructured(model, config, progress=progress)
        return warn_if_nothing_changed(note_already_compressed(report, before), "ts.prune")
    if isinstance(config, ChannelPrune):
        from .channels import prune_channels

        example_inputs = kwargs.pop("example_inputs", None)
        if kwargs:
            raise TypeError(f"prune: unexpected arguments {sorted(kwargs)}")
        calib_data = reusable(calib_data)
        report = prune_channels(model, config, calib_data, forward_loop, example_inputs, progress)
        return warn_if_nothing_changed(note_already_compressed(report, before), "ts.prune")
    raise TypeError(f"prune: expected a pruning config (Magnitude, RandomPrune, ChannelPrune), "
                    f"got {type(config).__name__}")


__all__ = ["prune", "finalize", "Schedule", "Magnitude", "RandomPrune", "ChannelPrune", "masks"]
