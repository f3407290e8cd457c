"""Save and load compressed models as safetensors (no pickle).

File layout: the model's whole state_dict (packed layers included) as safetensors
tensors, plus string metadata:
  tensorslim.format          "tensorslim"
  tensorslim.format_version  "1"
  tensorslim.version         the library version that wrote it
  tensorslim.layers          JSON {module name: spec}, spec = {"kind", "format",
                             "group_size", "in_features", "out_features", "bias"}
  tensorslim.aliases         JSON {state_dict key: key it shares storage with}
  tensorslim.pruning         (format version 2, pruned models only) JSON, see pruning/state.py:
                             masked layers; load gives a fresh model the pruned shapes first
  tensorslim.skipped         (optional, any version) JSON {module name: {"type", "reason",
                             "bytes"}}: layers a transform left as they were, and why, so that
                             ts.summary of the loaded model still lists them
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .conv1d import linear_shape
from .meta_parameters import take_meta_parameters
from .safetensors_read import read_tensors
from .nn import COMPRESSED_MODULES, SAVED_MODULES, ProjectedMultiheadAttention
from .pruning import state as pruning_state
from .report import LayerChange, Report, remember_skipped, skipped_rows
from .transforms import _set_submodule, module_aliases

FORMAT_NAME = "tensorslim"
SKIPPED_KEY = "tensorslim.skipped"
# 2 adds tensorslim.pruning, 3 its "biases" (layers pruning gave a bias: a reader without them
# would fail on the unexpected tensors); files write the lowest version they need
FORMAT_VERSION = 3
# keys every layer spec has (each kind's from_spec may read more)
_SPEC_KEYS = ("kind", "format", "in_features", "out_features", "bias")


def _tensor_place(t: torch.Tensor) -> tuple:
    """Where a tensor's elements lie: two state tensors at the same place are one tied tensor
    (strides included: a weight and its transposed view share storage, offset and a square
    shape, yet hold other values at each index)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()


def save(model: nn.Module, path: Union[str, Path]) -> None:
    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"save: expected a torch.nn.Module, got {type(model).__name__}")
    from .qat.prepare import QATLinear

    prepared = next((n for n, m in model.named_modules() if isinstance(m, QATLinear)), None)
    if prepared is not None:  # the file would load as a float model (or not at all)
        raise ValueError(f"save: layer '{prepared}' is prepared for QAT (a QATLinear), which the file format does "
                         f"not describe; call ts.convert(model) first (a training checkpoint: torch's state_dict)")
    target = _check_writable(Path(path))
    layers = layer_specs(model)
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = _tensor_place(t) + (t.dtype,) if t.numel() else None
        if ident is not None and ident in seen:  # tied weights are stored once
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    metadata = {
        "tensorslim.format": FORMAT_NAME,
        "tensorslim.format_version": "1",  # 2 or 3 only when the file needs it (pruning below)
        "tensorslim.version": __version__,
        "tensorslim.layers": json.dumps(layers, sort_keys=True),
        "tensorslim.aliases": json.dumps(aliases, sort_keys=True),
    }
    skipped = skipped_entry(model)
    if skipped:
        metadata[SKIPPED_KEY] = json.dumps(skipped, sort_keys=True)
    pruning = pruning_state.header_entry(model)
    if pruning:
        metadata[pruning_state.HEADER_KEY] = json.dumps(pruning, sort_keys=True)
        metadata["tensorslim.format_version"] = "3" if "biases" in pruning else "2"
    try:
        save_file(tensors, str(target), metadata=metadata)
        os.chmod(target, 0o666 & ~_umask())  # as open() would create it (the temporary file was 0600)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot write the file: {e}") from None


def layer_specs(model: nn.Module) -> Dict[str, dict]:
    """{module name: spec} of every compressed layer and unpacked attention (what a saved file's
    header lists)."""
    kinds = tuple(SAVED_MODULES.values())
    # every name of a module held under several (an alias): a fresh model may hold separate
    # float modules there, each to be replaced
    return {name: mod.spec() for name, mod in model.named_modules(remove_duplicate=False) if isinstance(mod, kinds)}


def _check_writable(path: Path) -> Path:
    """The file to write: a symlink's target (safetensors renames a new file over the path,
    which would replace the link itself); a device, pipe or socket there is refused (renaming
    over /dev/null replaced it)."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give a file name, e.g. {path / 'model.slim.safetensors'}")
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: exists and is not a regular file (a device, pipe or socket); "
                         f"ts.save writes a new file there")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{path}: the directory {parent} does not exist; create it first")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read(path: Union[str, Path], fn: Callable[[Any], Any]) -> Any:
    """fn(open safetensors file), with a missing, directory, truncated or corrupt file
    turned into an error naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path}: is a directory, not a file written by ts.save")
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not p.is_file():  # a pipe would block the read forever
        raise ValueError(f"{path}: is not a regular file (a device, pipe or socket), not a file written by ts.save")
    try:
        with safe_open(str(p), framework="pt") as f:
            return fn(f)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file: {e}") from None


def _json_field(path, meta: Dict[str, str], key: str, default: Optional[str] = None) -> dict:
    text = meta.get(key, default)
    if text is None:
        raise ValueError(f"{path}: corrupt tensorslim header: no {key} metadata")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt tensorslim header: {key} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: corrupt tensorslim header: {key} must be a JSON object, got "
                         f"{type(value).__name__}")
    return value


def read_header(path: Union[str, Path]) -> dict:
    """The tensorslim metadata of a file, checked and decoded."""
    meta = _read(path, lambda f: f.metadata() or {})
    if meta.get("tensorslim.format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a tensorslim file (no tensorslim.format metadata)")
    text = meta.get("tensorslim.format_version", "0")
    try:
        version = int(text)
    except ValueError:
        raise ValueError(f"{path}: corrupt tensorslim header: format_version {text!r} is not an integer") from None
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version} is not supported by this tensorslim "
                         f"(reads 1..{FORMAT_VERSION}); upgrade tensorslim")
    layers = _json_field(path, meta, "tensorslim.layers")
    check_layer_specs(layers, path)
    aliases = _json_field(path, meta, "tensorslim.aliases", "{}")
    pruning = _json_field(path, meta, pruning_state.HEADER_KEY, "{}")
    skipped = _json_field(path, meta, SKIPPED_KEY, "{}")
    for name, row in skipped.items():
        if not (isinstance(row, dict) and isinstance(row.get("type"), str) and isinstance(row.get("reason"), str)
                and type(row.get("bytes")) is int and row["bytes"] >= 0):
            raise ValueError(f"{path}: corrupt tensorslim header: {SKIPPED_KEY} row '{name}' is {row!r}, "
                             f"expected {{'type': str, 'reason': str, 'bytes': int}}")
    return {"version": version, "written_by": meta.get("tensorslim.version"), "layers": layers,
            "aliases": aliases, "pruning": pruning, "skipped": skipped}


def check_layer_specs(layers, path) -> None:
    """Every spec an object with the keys each kind has (the kind's own fields are checked when
    plan_layers builds it)."""
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: corrupt tensorslim header: layers must be an object, got {type(layers).__name__}")
    for name, spec in layers.items():
        missing = [k for k in _SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
        if missing:
            raise ValueError(f"{path}: corrupt tensorslim header: layer '{name}' spec {spec!r} lacks {missing}")


def check_stored(model: nn.Module, replacements: Dict[str, nn.Module], keys, path) -> None:
    """Each replacement's tensors are among the stored `keys`, under one of the names the module
    has in the model (one module under two names is stored once). A loader that fills what is
    missing with fresh memory (transformers') would otherwise run on uninitialized scales."""
    names: Dict[int, list] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    for name, new in replacements.items():
        wanted = list(new.state_dict())
        if not any(all(f"{alias}.{k}" in keys for k in wanted) for alias in names.get(id(new), [name])):
            missing = [f"{name}.{k}" for k in wanted if f"{name}.{k}" not in keys]
            raise ValueError(f"{path}: the tensors {missing} of compressed layer '{name}' are not stored")


def tensor_shapes(path: Union[str, Path]) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{name: (safetensors dtype name, shape)} of every tensor in a file, without reading data."""
    def shapes(f):
        out = {}
        for k in f.keys():
            s = f.get_slice(k)
            out[k] = (s.get_dtype(), tuple(s.get_shape()))
        return out

    return _read(path, shapes)


def read_file_tensors(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file in memory of its own (safetensors_read.py), once
    safe_open has validated the file; errors name it."""
    def read(_):
        try:
            return read_tensors(path)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return _read(path, read)


def _read_state(path, aliases: Dict[str, str]) -> Dict[str, torch.Tensor]:
    state = read_file_tensors(path)
    for alias, key in aliases.items():
        if not isinstance(key, str) or alias in state:
            raise ValueError(f"{path}: corrupt tensorslim header: alias {alias!r} -> {key!r} must name another "
                             f"stored tensor, and not one stored itself")
        if key not in state:
            raise ValueError(f"{path}: corrupt tensorslim header: alias {alias!r} points to missing tensor {key!r}")
        state[alias] = state[key]
    return state


def _mismatch(model: nn.Module, state: Dict[str, torch.Tensor]) -> str:
    """Why `state` cannot be loaded into `model` as is ('' if it can), checked before anything
    is copied: load_state_dict copies matching tensors before it reports the rest."""
    expected = model.state_dict()
    problems = [f"missing {sorted(expected.keys() - state.keys())}"] if expected.keys() - state.keys() else []
    if state.keys() - expected.keys():
        problems.append(f"unexpected {sorted(state.keys() - expected.keys())}")
    for k in expected.keys() & state.keys():
        want, got = expected[k], state[k]
        same_kind = want.dtype == got.dtype or (want.is_floating_point() and got.is_floating_point())
        if want.shape != got.shape or not same_kind:
            problems.append(f"{k}: file has {got.dtype} {tuple(got.shape)}, model {want.dtype} {tuple(want.shape)}")
    return "; ".join(problems)


def _inside_replacement(replacements: Dict[str, nn.Module], name: str):
    """The submodule `name` of a layer already replaced in this load (a factor), or None."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the innermost replaced parent first
        new = replacements.get(".".join(parts[:cut]))
        if new is not None:
            try:
                return new.get_submodule(".".join(parts[cut:]))
            except AttributeError:
                return None
    return None


def load(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a saved compressed model into a freshly built (uncompressed) `model`.

    The layers the file describes are replaced by empty compressed modules, then every
    tensor is loaded strictly. On any error (a missing, truncated or corrupt file, or one that
    does not match the model) the model is left as it was, and the error names the file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load: expected a torch.nn.Module, got {type(model).__name__}")
    on_meta = next((k for k, t in model.named_buffers() if t.device.type == "meta"), None)
    if on_meta is not None:  # a buffer the file need not hold (rotary inv_freq): its values are gone
        raise ValueError(f"load: the model's buffer '{on_meta}' is on the meta device, its values lost; build "
                         f"the model with `with ts.empty_parameters(): model = ...` (parameters on meta, "
                         f"filled from the file; buffers computed) or on a real device. model.to_empty() "
                         f"would leave buffers the file does not hold uninitialized")
    header = read_header(path)
    # Pruned models: the file's shapes and masks go onto the model first, those of layers inside
    # a replacement (a factorized layer's factors, pruned after factorizing) once it is in;
    # undone on failure.
    now, inside = pruning_state.split_entry(header["pruning"] or {}, model, header["layers"])
    shapes = tensor_shapes(path) if header["pruning"] else {}
    undo = pruning_state.prepare_load(model, now, shapes, path) if now else None
    try:
        _load_into(model, path, header,
                   (lambda: pruning_state.prepare_load(model, inside, shapes, path)) if inside else None)
    except BaseException:
        if undo is not None:
            undo()
        raise
    from .hf import record_layers

    record_layers(model)  # a transformers model's config now describes its compressed layers
    remember_skipped(model, Report([LayerChange(name, row["type"], "skipped", bytes_before=row["bytes"],
                                                reason=row["reason"]) for name, row in header["skipped"].items()]))
    return model


def skipped_entry(model: nn.Module) -> Dict[str, dict]:
    """The header's record of the layers transforms skipped (what ts.summary lists of them)."""
    names, kinds = dict(model.named_modules()), tuple(COMPRESSED_MODULES.values())
    return {c.name: {"type": c.module_type, "reason": c.reason, "bytes": int(c.bytes_before)}
            for c in skipped_rows(model) if c.name in names and not isinstance(names[c.name], kinds)}


def _load_into(model: nn.Module, path, header: dict, after_swap=None) -> nn.Module:
    resized = tuple(f"{n}." for n in (header["pruning"] or {}).get("structured", {}))
    shapes = {k: v for k, v in tensor_shapes(path).items() if not k.startswith(resized)}
    originals, replacements = plan_layers(model, header["layers"], path, shapes, on_meta=True)
    state = _read_state(path, header["aliases"])

    def swapped():  # the caller's step, then the float layers' meta parameters take the file's tensors
        undo = after_swap() if after_swap is not None else None
        try:
            take = take_meta_parameters(model, state)
        except BaseException:
            if undo is not None:
                undo()
            raise
        return lambda: (take(), undo() if undo is not None else None)

    return load_layers_and_state(model, originals, replacements, state, path, after_swap=swapped)


def plan_layers(model: nn.Module, layers: Dict[str, dict], path,
                shapes: Optional[Dict[str, Tuple[str, Tuple[int, ...]]]] = None,
                on_meta: bool = False) -> Tuple[dict, dict]:
    """({name: float layer}, {name: empty compressed module}) for the layers a file describes;
    nothing in the model is changed yet. shapes (the file's tensors, tensor_shapes): each spec
    is first built on the meta device and its tensors' shapes compared with the file's, so a
    corrupt size (nnz = 2**40) is an error, not an allocation. on_meta: the modules stay on the
    meta device; load_layers_and_state gives them the file's tensors themselves."""
    modules = dict(model.named_modules(remove_duplicate=False))  # an alias is listed under each name
    originals, replacements = {}, {}
    # Sorted, a factorized layer comes before its (possibly quantized) factors, which are then
    # found inside its replacement.
    for name, spec in sorted(layers.items()):
        cls = SAVED_MODULES.get(spec.get("kind"))
        if cls is None:
            raise ValueError(f"{path}: layer '{name}' has unknown kind {spec.get('kind')!r}")
        # inside a layer replaced above (a factor; an unpacked attention's projection, whose
        # shape may differ from the packed original's child of the same name: pruned heads)
        mod = _inside_replacement(replacements, name)
        if mod is None:
            mod = modules.get(name)
        if mod is None:
            raise ValueError(f"{path}: layer '{name}' does not exist in the model")
        if isinstance(mod, cls) and mod.spec() == spec and not isinstance(mod, ProjectedMultiheadAttention):
            continue  # already in this form (an unpacked attention is rebuilt: its projections come after it)
        try:
            fits = cls.replaces(mod, spec) if hasattr(cls, "replaces") else None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: layer '{name}': the file's spec {spec} is not valid: {e!r}") from None
        if fits is False:  # factorized layers replace convs as well as linears
            raise ValueError(f"{path}: layer '{name}' is {mod}, but the file holds a "
                             f"{spec['kind']} made from a different layer: {spec}")
        if fits is None and (linear_shape(mod) != (spec["in_features"], spec["out_features"])  # Linear, Conv1D
                             or spec["bias"] != (getattr(mod, "bias", None) is not None)):
            raise ValueError(f"{path}: layer '{name}' is {mod}, but the file holds a "
                             f"[{spec['out_features']}, {spec['in_features']}] {spec['format']} linear "
                             f"{'with' if spec['bias'] else 'without'} bias")
        weight = _float_parameter(mod)
        device = weight.device if weight.device.type != "meta" else "cpu"
        originals[name] = mod
        try:
            if shapes is not None:
                _check_spec_shapes(cls, spec, name, shapes)
            replacements[name] = _empty_like_saved(cls, spec, "meta" if on_meta else device, weight.dtype)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: layer '{name}': the file's spec {spec} is not valid: {e!r}") from None
    return originals, replacements


def _float_parameter(mod: nn.Module) -> torch.Tensor:
    """The layer's weight (nn.MultiheadAttention has none: its first floating parameter)."""
    weight = getattr(mod, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(p for p in mod.parameters() if p.is_floating_point())


def _check_spec_shapes(cls, spec: dict, name: str, shapes: Dict[str, Tuple[str, Tuple[int, ...]]]) -> None:
    """The tensors the spec makes (built on meta: no memory) against the file's (those of
    layers the file's pruning header resizes, a factor pruned after factorizing, are absent
    from `shapes`: checked once resized)."""
    meta = cls.from_spec(spec, device="meta")
    made = meta.spec()
    differ = sorted(k for k in made.keys() & spec.keys() if made[k] != spec[k])
    if differ:  # a field the module ignored or read otherwise (format "int8" on a binary layer)
        raise ValueError(f"the module it makes has {', '.join(f'{k}={made[k]!r}' for k in differ)}")
    for key, t in meta.state_dict().items():
        got = shapes.get(f"{name}.{key}")
        if got is not None and tuple(got[1]) != tuple(t.shape):
            raise ValueError(f"tensor '{name}.{key}' is {list(got[1])} in the file, the spec makes "
                             f"{list(t.shape)}")


def _empty_like_saved(cls, spec: dict, device, dtype: torch.dtype) -> nn.Module:
    """An empty module of a saved kind, with the buffer dtypes its kernels need even where the
    caller set another default dtype (transformers builds half models under one), computing in
    the dtype of the float layer it replaces when that is a half dtype."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        new = cls.from_spec(spec, device=device)
    finally:
        torch.set_default_dtype(saved)
    return new.to(dtype) if dtype in (torch.float16, torch.bfloat16) else new


def _fill_tied(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Keys missing from `state` whose tensor the model shares with a key present (tied
    weights, which save_pretrained writes once) take that key's tensor."""
    by_storage: Dict[tuple, list] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            by_storage.setdefault(_tensor_place(t), []).append(key)
    for keys in by_storage.values():
        present = [k for k in keys if k in state]
        for k in keys:
            if k not in state and present:
                state[k] = state[present[0]]


def _fill_meta_replacements(originals: dict, replacements: dict, state: Dict[str, torch.Tensor]) -> None:
    """Replacements built on the meta device (plan_layers(on_meta=True)) take the file's tensors
    themselves (read into memory of their own: safetensors_read.py), on their float layer's
    device, in their own dtypes: the compressed tensors are held once (read, then copied into
    empty modules, they were held twice). A tensor the file lacks or holds in another shape
    stays on meta for _mismatch to report."""
    for name, new in replacements.items():
        weight = _float_parameter(originals[name])
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        for sub, m in new.named_modules():
            prefix = f"{name}.{sub}." if sub else f"{name}."
            for table in (m._parameters, m._buffers):
                for attr, t in table.items():
                    got = state.get(prefix + attr) if t is not None and t.device.type == "meta" else None
                    if got is None or got.shape != t.shape:
                        continue
                    value = got.to(device=device, dtype=t.dtype)
                    table[attr] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else value


def load_layers_and_state(model: nn.Module, originals: dict, replacements: dict, state: Dict[str, torch.Tensor],
                          path, fill_tied: bool = False, after_swap=None) -> nn.Module:
    """Swap the replacements in, then load `state` strictly; on a mismatch the originals go back.
    fill_tied: tied weights stored once (save_pretrained) are filled from their twin first.
    after_swap: run once the replacements are in, before the state; returns its undo."""
    aliases = module_aliases(model)
    for name, new in replacements.items():
        _set_submodule(model, name, new, aliases)
    undo_after_swap = None
    try:
        _fill_meta_replacements(originals, replacements, state)
        if after_swap is not None:
            undo_after_swap = after_swap()
        if fill_tied:
            _fill_tied(model, state)
        problem = _mismatch(model, state)
        if problem:
            raise ValueError(problem)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        if undo_after_swap is not None:
            undo_after_swap()
        aliases = module_aliases(model)
        for name, old in reversed(list(originals.items())):  # factors before their layer
            _set_submodule(model, name, old, aliases)
        raise ValueError(f"{path}: the file does not match the model: {e}") from None
    from .attention import settle_encoders
    from .quantization.conv_epilogue import fuse_conv_epilogues

    fuse_conv_epilogues(model)  # derived from the model's code, never saved: done again on load
    settle_encoders(model)  # unpacked attentions: no nested-tensor fast path around them
    return model
