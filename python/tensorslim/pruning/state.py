"""What ts.save writes about pruning (header key tensorslim.pruning) and how ts.load puts it
back into a fresh copy of the original architecture before the tensors are loaded.

  {"masks": [layer names carrying a weight_mask]}
"""
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from . import masks

HEADER_KEY = "tensorslim.pruning"


def header_entry(model: nn.Module) -> dict:
    """The header object of a pruned model, {} when nothing is pruned."""
    names = sorted(masks.masked_layers(model))
    return {"masks": names} if names else {}


def prepare_load(model: nn.Module, entry: dict, shapes: Dict[str, Tuple[str, Tuple[int, ...]]],
                 path) -> Callable[[], None]:
    """Give `model` the masks the file holds (filled by the load that follows); returns
    an undo that restores the model exactly (called when the load fails)."""
    names = entry.get("masks", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: corrupt tensorslim header: {HEADER_KEY} masks must be a list of names")
    modules = dict(model.named_modules())
    added = []

    def undo():
        for mod in added:
            masks.detach(mod, bake=False)

    try:
        for name in names:
            mod = modules.get(name)
            if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
                raise ValueError(f"{path}: pruned layer '{name}' does not exist in the model (or has no weight)")
            if not masks.is_masked(mod):
                # Attach an all-kept mask without touching the weight; load fills both.
                masks.attach_without_zeroing(mod)
                added.append(mod)
    except BaseException:
        undo()
        raise
    return undo
