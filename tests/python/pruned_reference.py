"""The reference a structural pruning must equal: the original model with every removed
channel's input columns zeroed in the layers that read them (those channels then contribute
nothing), built from ChannelPrune's own plan."""
import copy

import torch

from tensorslim.pruning import channels as C


def zeroed_reference(model, cfg, example=None):
    """(reference model, removed indices per (module, tensor, dim)) for `cfg` on `model`;
    example: the inputs tracing needs (None for transformer blocks)."""
    ref = copy.deepcopy(model)
    removed, _, _ = C.plan(ref, C.build_spaces(ref, cfg, None, example), cfg, None)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for (name, param, dim), idx in removed.items():
            if param == "weight" and dim == 1:
                getattr(mods[name], param).index_fill_(1, torch.tensor(idx), 0.0)
    return ref, removed
