"""Padding tokens left out of calibration statistics.

A batch of sentences tokenized with `padding=True` is mostly padding when lengths vary (65%
of the tokens in 32-sentence batches of pydoc prose for MiniLM). Those positions run through
every layer like real tokens, and counting them in activation ranges, Hessians and norms
calibrated to inputs the model never sees: with them MiniLM's embedding cosine after AWQ INT4
was 0.9706 instead of 0.9767, after Wanda 50% 0.8485 instead of 0.8613 (docs/awq_gptq.md).

While a calibration batch that is a dict with a 2-D 0/1 `attention_mask` runs, that mask is
current (`padding`); `rows(x, width)` gives a statistics hook the rows of a [B, T, width]
activation whose first two dimensions match it, without the padded positions. Other shapes
(a model that transposes to [T, B, width]) keep every row. `layer_rows(layer, x)` gives a
convolution's unfolded input patches instead (its weight's columns), every one.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

_current: ContextVar[Optional[torch.Tensor]] = ContextVar("tensorslim_padding_mask", default=None)


def of_batch(batch: Any) -> Optional[torch.Tensor]:
    """The [B, T] bool mask of real tokens of a calibration batch, or None (no attention_mask,
    not a 0/1 matrix, or no padding in it). A batch of padding only gives no rows."""
    if not (isinstance(batch, dict) or hasattr(batch, "items")):
        return None
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.numel() == 0:
        return None
    if not bool(((mask == 0) | (mask == 1)).all()):
        return None  # an additive or otherwise encoded mask: not padding flags
    real = mask.bool()
    return None if bool(real.all()) else real


@contextmanager
def padding(mask: Optional[torch.Tensor]) -> Iterator[None]:
    """`mask` is the current batch's real-token mask inside (None: every row counts)."""
    token = _current.set(mask)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Optional[torch.Tensor]:
    return _current.get()


def rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as [rows, width] for statistics: a [B, T, width] activation of the current batch
    without its padded positions, any other shape every row."""
    mask = _current.get()
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape) and x.shape[2] == width:
        return x[mask.to(x.device)]
    return x.reshape(-1, width)


def layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows `layer`'s weight matrix multiplies, [rows, columns] for statistics: a linear's input
    rows (rows()), or an nn.Conv1d / nn.Conv2d's input patches in its weight's column order
    (channel, then kernel row and column: F.unfold's), one row per output position."""
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return rows(x, layer.in_features)
    from ..nn.int8_conv import symmetric_padding

    one_d = isinstance(layer, nn.Conv1d)
    if x.dim() == len(layer.kernel_size) + 1:  # unbatched
        x = x.unsqueeze(0)
    kernel, stride, pad, dil = layer.kernel_size, layer.stride, symmetric_padding(layer), layer.dilation
    if one_d:
        x, kernel, stride, pad, dil = x.unsqueeze(2), (1, *kernel), (1, *stride), (0, *pad), (1, *dil)
    cols = F.unfold(x, kernel, dil, pad, stride)  # [B, C * kernel, positions]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def rows_key(layer: nn.Module) -> tuple:
    """Layers reading one tensor with equal keys see the same layer_rows (a linear's: its
    width; a conv's: its patch geometry)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return (type(layer), layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    return (nn.Linear, layer.in_features)
