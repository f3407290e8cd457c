"""Save and load compressed models as safetensors (no pickle).

File layout: the model's whole state_dict (packed layers included) as safetensors
tensors, plus string metadata:
  tensorslim.format          "tensorslim"
  tensorslim.format_version  "1"
  tensorslim.version         the library version that wrote it
  tensorslim.layers          JSON {module name: spec}, spec = {"kind", "format",
                             "group_size", "in_features", "out_features", "bias"}
  tensorslim.aliases         JSON {state_dict key: key it shares storage with}
"""
import json
from pathlib import Path
from typing import Dict, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .nn import COMPRESSED_MODULES
from .transforms import _set_submodule

FORMAT_NAME = "tensorslim"
FORMAT_VERSION = 1


def save(model: nn.Module, path: Union[str, Path]) -> None:
    from . import __version__

    kinds = tuple(COMPRESSED_MODULES.values())
    layers = {name: mod.spec() for name, mod in model.named_modules() if isinstance(mod, kinds)}
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:  # tied weights are stored once
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    metadata = {
        "tensorslim.format": FORMAT_NAME,
        "tensorslim.format_version": str(FORMAT_VERSION),
        "tensorslim.version": __version__,
        "tensorslim.layers": json.dumps(layers, sort_keys=True),
        "tensorslim.aliases": json.dumps(aliases, sort_keys=True),
    }
    save_file(tensors, str(path), metadata=metadata)


def read_header(path: Union[str, Path]) -> dict:
    """The tensorslim metadata of a file, checked and decoded."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("tensorslim.format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a tensorslim file (no tensorslim.format metadata)")
    version = int(meta.get("tensorslim.format_version", "0"))
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version} is not supported by this tensorslim "
                         f"(reads 1..{FORMAT_VERSION}); upgrade tensorslim")
    return {"version": version, "written_by": meta.get("tensorslim.version"),
            "layers": json.loads(meta["tensorslim.layers"]),
            "aliases": json.loads(meta.get("tensorslim.aliases", "{}"))}


def _inside_replacement(replacements: Dict[str, nn.Module], name: str):
    """The submodule `name` of a layer already replaced in this load (a factor), or None."""
    for parent, new in replacements.items():
        if name.startswith(parent + "."):
            try:
                return new.get_submodule(name[len(parent) + 1:])
            except AttributeError:
                return None
    return None


def load(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a saved compressed model into a freshly built (uncompressed) `model`.

    The layers the file describes are replaced by empty compressed modules, then every
    tensor is loaded strictly. On any error the model is left as it was.
    """
    header = read_header(path)
    modules = dict(model.named_modules())
    originals, replacements = {}, {}
    # Sorted, a factorized layer comes before its (possibly quantized) factors, which are then
    # found inside its replacement.
    for name, spec in sorted(header["layers"].items()):
        cls = COMPRESSED_MODULES.get(spec.get("kind"))
        if cls is None:
            raise ValueError(f"{path}: layer '{name}' has unknown kind {spec.get('kind')!r}")
        mod = modules.get(name)
        if mod is None:
            mod = _inside_replacement(replacements, name)
        if mod is None:
            raise ValueError(f"{path}: layer '{name}' does not exist in the model")
        if isinstance(mod, cls) and mod.spec() == spec:
            continue  # already in this form
        if hasattr(cls, "replaces"):  # factorized layers replace convs as well as linears
            if not cls.replaces(mod, spec):
                raise ValueError(f"{path}: layer '{name}' is {mod}, but the file holds a "
                                 f"{spec['kind']} made from a different layer: {spec}")
        elif not isinstance(mod, nn.Linear) or (mod.in_features, mod.out_features) != (
                spec["in_features"], spec["out_features"]):
            raise ValueError(f"{path}: layer '{name}' is {mod}, but the file holds a "
                             f"[{spec['out_features']}, {spec['in_features']}] {spec['format']} linear")
        device = mod.weight.device if mod.weight.device.type != "meta" else "cpu"
        originals[name] = mod
        replacements[name] = cls.from_spec(spec, device=device)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for alias, key in header["aliases"].items():
        state[alias] = state[key]
    for name, new in replacements.items():
        _set_submodule(model, name, new)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        for name, old in reversed(list(originals.items())):  # factors before their layer
            _set_submodule(model, name, old)
        raise ValueError(f"{path}: the file does not match the model: {e}") from None
    return model
