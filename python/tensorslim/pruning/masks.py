"""Keeping pruned weights at zero while a model trains.

A pruned layer carries a bool buffer `weight_mask` (True = kept; in its state_dict, so masks
survive state_dict save / load) and three guards, since no single one covers every path
(the forward pre-hook, which a deep copy keeps, puts the other two on a copy's own weight):
  - a gradient hook zeroes the gradient of pruned weights (plain SGD, weight decay on a zero
    weight and Adam started after pruning then never move them);
  - a global optimizer step post-hook re-zeroes them after any optimizer's step (momentum or
    Adam state from before pruning would otherwise move them);
  - a forward pre-hook re-applies the mask (weights edited or loaded by hand).
finalize() bakes the zeros in and removes all of it.
"""
import weakref
from typing import Dict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn

from .._user_warning import warn_user

MASK = "weight_mask"
# id(parameter) -> weak ref to its module, for the optimizer hook (pruning holds nothing alive;
# the hook checks the module's weight is still that parameter, so a reused id is harmless).
_MASKED: Dict[int, "weakref.ref"] = {}
# module -> (weak ref to the parameter its gradient hook sits on, that hook's handle). Kept
# outside the module: a deep copy of the module (or a layer that takes over its weight, as
# QATLinear) has no entry, so its forward pre-hook hooks the weight it holds (_guard).
_GRAD_HOOKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_optimizer_hook = None


def _reapply_after_step(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = _MASKED.get(id(p))
            mod = ref() if ref is not None else None
            if mod is not None and getattr(mod, "weight", None) is p:
                with torch.no_grad():
                    p.mul_(getattr(mod, MASK))


def _ensure_optimizer_hook() -> None:
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_reapply_after_step)


def _masked_grad(mod_ref: "weakref.ref"):
    def hook(g):
        mod = mod_ref()
        return g * getattr(mod, MASK) if mod is not None and hasattr(mod, MASK) else g
    return hook


def _guard(module: nn.Module) -> None:
    """The gradient hook and the optimizer hook's entry on the weight the module holds now
    (after a deep copy the copy's weight has neither: its Adam steps moved pruned weights)."""
    weight = module.weight
    hooked = _GRAD_HOOKS.get(module)
    # A frozen weight takes no hook (torch refuses one); the next forward hooks it once unfrozen.
    if weight.requires_grad and (hooked is None or hooked[0]() is not weight):
        if hooked is not None:
            hooked[1].remove()
        _GRAD_HOOKS[module] = (weakref.ref(weight), weight.register_hook(_masked_grad(weakref.ref(module))))
    _MASKED[id(weight)] = weakref.ref(module)


def _forward_pre_hook(module: nn.Module, args) -> None:
    weight = module._parameters.get("weight")
    if weight is not None and not isinstance(weight, nn.Parameter):
        # A plain tensor stands in for the weight (torch.func.functional_call's): the caller's
        # tensor, used as given and never written (the mask was zeroing it in place). Masking
        # it out of place would not do either: functional_call writes a replaced tensor back
        # into the caller's dict, and torch.func.grad then differentiates that one.
        warn_user("a pruned layer runs with a weight tensor passed in for it (torch.func.functional_call): used "
                  "as given, its mask not applied; pass weight * layer.weight_mask to keep the layer pruned "
                  "(functional training loops otherwise regrow pruned weights)")
        return
    _guard(module)
    # Through .data: the weight's version counter stays, so a graph that saved the weight in
    # an earlier forward (two forwards before one backward, a shared layer, a no_grad forward
    # in between) still backpropagates. On an already masked weight this changes no value.
    module.weight.data.mul_(getattr(module, MASK))


def reapply(model: nn.Module) -> None:
    """Zero every masked layer's pruned weights, as its forward pre-hook does: the verbs that
    replace layers read the weights directly (a weight loaded or edited after pruning, with
    no forward since, was compressed dense: the mask was lost)."""
    for module in model.modules():
        if is_masked(module) and isinstance(module._parameters.get("weight"), nn.Parameter):
            module.weight.data.mul_(getattr(module, MASK))


def is_masked(module: nn.Module) -> bool:
    return (isinstance(getattr(module, MASK, None), torch.Tensor)
            and any(h is _forward_pre_hook for h in module._forward_pre_hooks.values()))


def attach(module: nn.Module, keep: torch.Tensor, zero: bool = True) -> None:
    """Zero the weights where keep is False and keep them there (replaces an earlier mask)."""
    # one copy, the module's own (a caller's uint8 mask was converted, then cloned: twice)
    keep = keep.to(device=_mask_device(module), dtype=torch.bool, copy=True).reshape(module.weight.shape)
    if zero:
        with torch.no_grad():
            module.weight.mul_(keep)
    if is_masked(module):
        getattr(module, MASK).copy_(keep)
    else:
        module.register_buffer(MASK, keep, persistent=True)
        module.register_forward_pre_hook(_forward_pre_hook)
    _guard(module)
    _ensure_optimizer_hook()


def _mask_device(module: nn.Module) -> torch.device:
    """The weight's device; the CPU for a weight still on meta (a model built under
    ts.empty_parameters, whose weight ts.load gives the file's tensor next)."""
    device = module.weight.device
    return torch.device("cpu") if device.type == "meta" else device


def attach_without_zeroing(module: nn.Module) -> None:
    """An all-kept mask whose contents a state_dict load fills in (ts.load)."""
    attach(module, torch.ones(module.weight.shape, dtype=torch.bool), zero=False)


def accept_saved_masks(model: nn.Module) -> None:
    """Let model.load_state_dict take a pruned checkpoint's masks: each `<layer>.weight_mask`
    in the loaded state gets an empty mask attached first (strict loading refused them as
    unexpected keys; non-strict dropped them, and the pruned weights grew back)."""
    if not getattr(model, "_tensorslim_accepts_masks", False):
        model.register_load_state_dict_pre_hook(_attach_incoming_masks)
        object.__setattr__(model, "_tensorslim_accepts_masks", True)


def _attach_incoming_masks(module: nn.Module, state_dict, prefix: str, *args) -> None:
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith("." + MASK)):
            continue
        try:
            layer = module.get_submodule(key[len(prefix):-len(MASK) - 1])
        except AttributeError:
            continue  # torch reports the key as unexpected
        weight = getattr(layer, "weight", None)
        if (isinstance(weight, torch.Tensor) and not is_masked(layer) and isinstance(value, torch.Tensor)
                and value.shape == weight.shape):
            attach_without_zeroing(layer)


def detach(module: nn.Module, bake: bool = True) -> None:
    """Remove the machinery; bake=True leaves the zeros in the weight."""
    if not is_masked(module):
        return
    if bake:
        with torch.no_grad():
            module.weight.mul_(getattr(module, MASK))
    for key in [k for k, h in module._forward_pre_hooks.items() if h is _forward_pre_hook]:
        del module._forward_pre_hooks[key]
    hooked = _GRAD_HOOKS.pop(module, None)
    if hooked is not None:
        hooked[1].remove()
    del module._buffers[MASK]
    ref = _MASKED.get(id(module.weight))
    if ref is not None and ref() is module:
        del _MASKED[id(module.weight)]


def masked_layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_masked(m)}


def sparsity(module: nn.Module) -> float:
    """Fraction of zeros in the module's weight."""
    w = module.weight
    return float((w == 0).sum()) / max(1, w.numel())


def finalize(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight and remove the pruning machinery (hooks, buffers).
    The zeros stay; nothing keeps them at zero in later training."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"finalize: expected a torch.nn.Module, got {type(model).__name__}")
    for mod in masked_layers(model).values():
        detach(mod, bake=True)
    return model


def summary_rows(model: nn.Module):
    """ts.summary's rows for pruned layers: the sparsity of each."""
    from ..report import LayerChange, module_bytes

    return [LayerChange(name, type(mod).__name__, "pruned", f"{sparsity(mod):.1%} sparse",
                        module_bytes(mod), module_bytes(mod), reason="masked (ts.pruning.finalize bakes it in)")
            for name, mod in masked_layers(model).items()]
