"""What ts.save writes about pruning (header key tensorslim.pruning) and how ts.load puts it
back into a fresh copy of the original architecture before the tensors are loaded.

  {"masks": [layer names carrying a weight_mask],
   "structured": {module name: {size attribute: value}},   (ChannelPrune; size_attrs names them)
   "biases": [layers given a bias they did not have: ChannelPrune(compensate=True),
              ts.sparsify(bias_correction=True, store="masks")]}
Structurally pruned tensors take their shapes from the file itself.
"""
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from . import masks
from ..transforms import float_weight
from .size_attrs import check_name, get_size, set_size

HEADER_KEY = "tensorslim.pruning"


def header_entry(model: nn.Module) -> dict:
    """The header object of a pruned model, {} when nothing is pruned."""
    from .channels import ADDED_BIASES_ATTR, STRUCTURED_ATTR

    out = {}
    names = sorted(masks.masked_layers(model))
    if names:
        out["masks"] = names
    structured = getattr(model, STRUCTURED_ATTR, None)
    if structured:
        out["structured"] = structured
    biases = getattr(model, ADDED_BIASES_ATTR, None)
    if biases:
        out["biases"] = list(biases)
    return out


def _resize(model, modules, structured, shapes, path, undo_log) -> None:
    """Give each structurally pruned module the file's tensor shapes and size attributes."""
    if not isinstance(structured, dict):
        raise ValueError(f"{path}: corrupt tensorslim header: {HEADER_KEY} structured must be an object")
    for name, attrs in structured.items():
        mod = modules.get(name)
        if mod is None or not isinstance(attrs, dict):
            raise ValueError(f"{path}: pruned layer '{name}' does not exist in the model")
        prefix = f"{name}." if name else ""
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            got = shapes.get(prefix + pname)
            if got is None or tuple(got[1]) == tuple(t.shape):
                continue
            empty = torch.empty(got[1], dtype=t.dtype, device=t.device if t.device.type != "meta" else "cpu")
            undo_log.append((mod, pname, t))
            if isinstance(t, nn.Parameter):
                setattr(mod, pname, nn.Parameter(empty, requires_grad=t.requires_grad))
            else:
                mod._buffers[pname] = empty
        for attr, value in attrs.items():
            # pruning only shrinks integer sizes: anything else (a method, a flag, a float
            # hyper-parameter, a size that grows) is a corrupt header, refused before it is set
            now = get_size(mod, attr) if isinstance(attr, str) and check_name(attr) else None
            if type(now) is not int:
                raise ValueError(f"{path}: pruned layer '{name}' has no size attribute {attr!r}")
            if type(value) is not int or not 0 < value <= now:
                raise ValueError(f"{path}: corrupt tensorslim header: pruned layer '{name}' {attr} = {value!r}, "
                                 f"expected an int in 1..{now} (the model's {attr} is {now})")
            undo_log.append((mod, attr, now))
            set_size(mod, attr, value)


def _add_biases(modules, names, shapes, path, biased: list) -> None:
    """Give each layer the file names (ChannelPrune's compensate or ts.sparsify's bias correction
    gave it a bias) an empty bias of the file's shape for the load to fill; `biased` collects
    them for the undo."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: corrupt tensorslim header: {HEADER_KEY} biases must be a list of names")
    for name in names:
        mod = modules.get(name)
        got = shapes.get(f"{name}.bias" if name else "bias")
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or got is None:
            raise ValueError(f"{path}: layer '{name}' with an added bias is not a linear or conv of the model, or "
                             f"the file holds no bias for it")
        if mod.bias is None:
            w = mod.weight
            mod.bias = nn.Parameter(torch.zeros(got[1], dtype=w.dtype, device=w.device if w.device.type != "meta"
                                                else "cpu"), requires_grad=w.requires_grad)
            biased.append(mod)


def split_entry(entry: dict, model: nn.Module, replaced=()) -> Tuple[dict, dict]:
    """(the part of a header entry naming modules the model has now, the rest: layers inside a
    replacement the load puts in first, such as a factorized layer's factors, or a masked
    out_proj of an attention the file holds unpacked; `replaced`: the names the load replaces).
    A malformed entry goes whole into the first part, where prepare_load reports it."""
    names, structured, biases = entry.get("masks", []), entry.get("structured", {}), entry.get("biases", [])
    if not isinstance(names, list) or not isinstance(structured, dict) or not isinstance(biases, list):
        return dict(entry), {}
    modules = dict(model.named_modules())
    inside_replaced = tuple(f"{r}." for r in replaced)
    here = lambda n: not isinstance(n, str) or (n in modules and not n.startswith(inside_replaced))  # noqa: E731
    now, inside = {}, {}
    for part, keep in ((now, True), (inside, False)):
        masked = [n for n in names if here(n) == keep]
        resized = {n: a for n, a in structured.items() if here(n) == keep}
        biased = [n for n in biases if here(n) == keep]
        if masked:
            part["masks"] = masked
        if resized:
            part["structured"] = resized
        if biased:
            part["biases"] = biased
    return now, inside


def prepare_load(model: nn.Module, entry: dict, shapes: Dict[str, Tuple[str, Tuple[int, ...]]],
                 path) -> Callable[[], None]:
    """Give `model` the masks the file holds (filled by the load that follows); returns
    an undo that restores the model exactly (called when the load fails)."""
    names = entry.get("masks", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: corrupt tensorslim header: {HEADER_KEY} masks must be a list of names")
    modules = dict(model.named_modules())
    added, biased, undo_log = [], [], []

    def undo():
        for mod in added:
            masks.detach(mod, bake=False)
        for mod in biased:
            mod.bias = None
        if biased:
            from .channels import ADDED_BIASES_ATTR

            object.__setattr__(model, ADDED_BIASES_ATTR, had_biases)
        for mod, attr, old in reversed(undo_log):
            if isinstance(old, torch.Tensor) and not isinstance(old, nn.Parameter) and attr in mod._buffers:
                mod._buffers[attr] = old
            elif isinstance(old, torch.Tensor):
                setattr(mod, attr, old)
            else:
                set_size(mod, attr, old)
        if structured:
            from .channels import STRUCTURED_ATTR

            if had_record:
                object.__setattr__(model, STRUCTURED_ATTR, had_record)
            elif hasattr(model, STRUCTURED_ATTR):
                object.__delattr__(model, STRUCTURED_ATTR)

    structured = entry.get("structured", {})
    try:
        if structured:
            from .channels import STRUCTURED_ATTR

            had_record = getattr(model, STRUCTURED_ATTR, None)
            _resize(model, modules, structured, shapes, path, undo_log)
            object.__setattr__(model, STRUCTURED_ATTR, dict(structured))
        from .channels import ADDED_BIASES_ATTR

        had_biases = list(getattr(model, ADDED_BIASES_ATTR, []))
        _add_biases(modules, entry.get("biases", []), shapes, path, biased)
        if biased:  # a later ts.save names them again
            object.__setattr__(model, ADDED_BIASES_ATTR, sorted(set(had_biases) | set(entry["biases"])))
        for name in names:
            mod = modules.get(name)
            if mod is None or float_weight(mod) is None:
                raise ValueError(f"{path}: pruned layer '{name}' does not exist in the model (or has no weight)")
            if not masks.is_masked(mod):
                # Attach an all-kept mask without touching the weight; load fills both.
                masks.attach_without_zeroing(mod)
                added.append(mod)
    except BaseException:
        undo()
        raise
    return undo
