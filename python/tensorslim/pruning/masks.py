"""Keeping pruned weights at zero while a model trains.

A pruned layer carries a bool buffer `weight_mask` (True = kept; in its state_dict, so masks
survive state_dict save / load) and three guards, since no single one covers every path:
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

MASK = "weight_mask"
_HANDLES = "_tensorslim_prune_handles"
# id(parameter) -> weak ref to its module, for the optimizer hook (pruning holds nothing alive;
# the hook checks the module's weight is still that parameter, so a reused id is harmless).
_MASKED: Dict[int, "weakref.ref"] = {}
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


def _forward_pre_hook(module: nn.Module, args) -> None:
    with torch.no_grad():
        module.weight.mul_(getattr(module, MASK))


def is_masked(module: nn.Module) -> bool:
    return isinstance(getattr(module, MASK, None), torch.Tensor) and hasattr(module, _HANDLES)


def attach(module: nn.Module, keep: torch.Tensor, zero: bool = True) -> None:
    """Zero the weights where keep is False and keep them there (replaces an earlier mask)."""
    keep = keep.to(device=module.weight.device, dtype=torch.bool).reshape(module.weight.shape)
    if zero:
        with torch.no_grad():
            module.weight.mul_(keep)
    if is_masked(module):
        getattr(module, MASK).copy_(keep)
        return
    module.register_buffer(MASK, keep.clone(), persistent=True)
    mod_ref = weakref.ref(module)
    grad = module.weight.register_hook(lambda g: g * getattr(mod_ref(), MASK))
    fwd = module.register_forward_pre_hook(_forward_pre_hook)
    object.__setattr__(module, _HANDLES, (grad, fwd))
    _MASKED[id(module.weight)] = mod_ref
    _ensure_optimizer_hook()


def attach_without_zeroing(module: nn.Module) -> None:
    """An all-kept mask whose contents a state_dict load fills in (ts.load)."""
    attach(module, torch.ones(module.weight.shape, dtype=torch.bool), zero=False)


def detach(module: nn.Module, bake: bool = True) -> None:
    """Remove the machinery; bake=True leaves the zeros in the weight."""
    if not is_masked(module):
        return
    if bake:
        with torch.no_grad():
            module.weight.mul_(getattr(module, MASK))
    for h in getattr(module, _HANDLES):
        h.remove()
    object.__delattr__(module, _HANDLES)
    del module._buffers[MASK]
    _MASKED.pop(id(module.weight), None)


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
