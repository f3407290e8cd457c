"""store="masks": ts.sparsify's pruning left in dense layers held by ts.prune's masks, for
fine-tuning before the weights are stored sparse (the recovery step one-shot pruning is usually
followed by: Wanda's paper fine-tunes its pruned models, LLM Compressor holds masks constant).

The calibration pipeline runs as for sparse storage (each block calibrated on the pruned blocks
before it); then every sparse module it built gives its weights back to the layer it replaced:
the original module object (an nn.Linear, a Conv1d / Conv2d, a transformers Conv1D, an
nn.Linear subclass) with the kept weights (SparseGPT's updated ones) written in, the bias
bias correction gave (a layer without one gets it; ts.save / ts.load recreate it) and a mask of
exactly the kept positions attached. Training keeps the pruned weights at zero (n:m groups stay
n:m); ts.sparsify(model, ts.SparseStorage()) then stores them sparse.
"""
from typing import Dict

import torch
from torch import nn

from ..conv1d import is_conv1d
from ..nn.compute_dtype import held_bias
from ..nn.sparse_linear import CSRSparseLinear, NMSparseLinear
from ..pruning import masks as pruning_masks
from ..pruning.channels import ADDED_BIASES_ATTR
from ..report import Report, module_bytes
from ..transforms import _set_submodule


def kept_mask(mod: nn.Module) -> torch.Tensor:
    """bool [out, columns]: the positions a sparse module stores."""
    if isinstance(mod, CSRSparseLinear):
        rows = torch.repeat_interleave(torch.arange(mod.out_features), mod.row_ptr.diff().cpu())
        keep = torch.zeros(mod.out_features, mod.in_features, dtype=torch.bool)
        keep[rows, mod.cols.cpu().long()] = True
        return keep
    if isinstance(mod, NMSparseLinear):
        from ..ops import sparse as S

        # every slot set to 1 (float values), unpacked over the whole last group: its padding
        # slots (a partial group of r < m columns keeps min(n, r)) land past in_features
        width = -(-mod.in_features // mod.m) * mod.m
        ones = S.nm_unpack(torch.ones_like(mod.values), mod.indices, None, mod.n, mod.m, width)
        return ones[:, :mod.in_features] != 0
    raise TypeError(f"{type(mod).__name__} is not a sparse layer")


def _in_layout(original: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A [out, columns] tensor in the original layer's weight layout."""
    return t.t().contiguous() if is_conv1d(original) else t.reshape(original.weight.shape)


def restore_masked(model: nn.Module, report: Report, originals: Dict[str, nn.Module]) -> Report:
    """Put each layer the report sparsified back as its original module, pruned by a mask."""
    rows = [c for c in report.changes if c.action == "sparsified"]
    staged = []
    try:
        for row in rows:  # everything that can fail, before the originals change
            sparse, original = model.get_submodule(row.name), originals[row.name]
            weight = _in_layout(original, sparse.dense_weight()).to(original.weight.dtype)
            bias = held_bias(sparse)  # bias correction changed it
            bias = bias.detach().to(original.weight.dtype) if bias is not None else None
            fmt = row.format.replace(f" {sparse.values_dtype}", " masks", 1)  # its pattern and method, masked
            staged.append((row, original, weight, bias, _in_layout(original, kept_mask(sparse)), fmt))
    except BaseException:
        for row in rows:  # the untouched originals back: the model as it was
            _set_submodule(model, row.name, originals[row.name])
        raise
    added = []
    for row, original, weight, bias, keep, fmt in staged:
        with torch.no_grad():
            original.weight.copy_(weight)
            if bias is not None and original.bias is None:
                original.bias = nn.Parameter(bias, requires_grad=original.weight.requires_grad)
                added.append(row.name)
            elif bias is not None:
                original.bias.copy_(bias)
        pruning_masks.attach(original, keep)
        _set_submodule(model, row.name, original)
        row.action, row.format, row.bytes_after = "pruned", fmt, module_bytes(original)
    if added:  # ts.save names them, so that ts.load gives a fresh model those biases
        object.__setattr__(model, ADDED_BIASES_ATTR, sorted(set(getattr(model, ADDED_BIASES_ATTR, [])) | set(added)))
    return report
