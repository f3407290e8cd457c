"""Which layers a low-rank transform considers, checked before anything is computed."""
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import LayerFilter
from ..transforms import _tied_to_embedding, factor_reason, filter_reason


def factor_parents(model: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """Names of the layers inside already factorized modules (their factors) -> (that module's
    name, that module)."""
    from ..nn import CPConv2d, LowRankLinear, TuckerConv2d

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (LowRankLinear, TuckerConv2d, CPConv2d)):
            for child, _ in mod.named_modules():
                if child:
                    out[f"{name}.{child}"] = (name, mod)
    return out


def candidates(model: nn.Module, flt: LayerFilter, kind: type) -> Dict[str, nn.Module]:
    """Layers of exactly this type that the filter selects and that are not factors already;
    a NaN/Inf weight among them is a ValueError naming the layer (nothing is changed yet)."""
    tied = _tied_to_embedding(model)
    factors = factor_parents(model)
    out = {}
    for name, mod in model.named_modules():
        if name and type(mod) is kind and name not in factors and not filter_reason(name, mod, flt, tied):
            if mod.weight.device.type == "meta":
                raise ValueError(f"layer '{name}' ({kind.__name__}): weight is on the meta device (no data to "
                                 f"factorize); load the weights first, or leave it out with exclude=[{name!r}]")
            if not torch.isfinite(mod.weight.detach()).all():
                raise ValueError(f"layer '{name}' ({kind.__name__}): weight contains NaN or Inf; "
                                 f"it cannot be factorized")
            out[name] = mod
    return out


def skip_check(plans: Dict[str, Tuple[Optional[str], object]], factors: Dict[str, Tuple[str, nn.Module]]):
    """check(name, module) for transforms.replace_modules: the plan's skip reason."""
    def check(name: str, mod: nn.Module) -> Optional[str]:
        if name in factors:
            return factor_reason(*factors[name])
        reason, _ = plans.get(name, ("not selected", None))
        return reason
    return check
