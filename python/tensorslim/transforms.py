"""The shared mechanics of every module transform: pick layers, build the
replacements first, then swap them in, so a failure leaves the model as it was."""
import collections
import contextlib
import fnmatch
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LayerFilter
from .nn.layer_errors import name_layer
from .report import LayerChange, Report, compressed_layers, module_bytes, remember_skipped

# Last name components that users mean by "the output head".
OUTPUT_HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "head", "output_head", "pooler"}


def float_weight(mod: nn.Module) -> Optional[nn.Parameter]:
    """A float layer's own weight parameter, else None. Compressed and factorized layers have
    a read-only `.weight` computed on access (a plain tensor, dequantized at some cost): it is
    not a weight a technique may edit, so code asking "is this a float layer" asks this."""
    from .nn import COMPRESSED_MODULES, CompressedLinear

    if isinstance(mod, (CompressedLinear, *COMPRESSED_MODULES.values())):
        return None
    weight = getattr(mod, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def _tied_to_embedding(model: nn.Module) -> set:
    """ids of parameters shared with an nn.Embedding (tied output heads)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def filter_reason(name: str, module: nn.Module, flt: LayerFilter, tied: set) -> Optional[str]:
    """Why the filter leaves this layer alone, or None to transform it."""
    if flt.include and not any(fnmatch.fnmatchcase(name, p) for p in flt.include):
        return "not matched by include"
    for p in flt.exclude:
        if fnmatch.fnmatchcase(name, p):
            return f"excluded by pattern {p!r}"
    if flt.skip_output_head:
        # The head itself (lm_head) or a layer inside one (pooler.dense).
        if OUTPUT_HEAD_NAMES & set(name.split(".")) or id(float_weight(module)) in tied:
            return "output head (skip_output_head=True)"
    if flt.filter_fn is not None and not flt.filter_fn(name, module):
        return "rejected by filter_fn"
    return None


def check_no_empty_layers(model: nn.Module, flt: LayerFilter, supported: Tuple[type, ...] = (nn.Linear,)) -> None:
    """A selected layer with a zero-size weight (in or out features 0) has nothing to quantize
    and breaks every kernel and calibration statistic: say so, naming it, before any work."""
    tied = _tied_to_embedding(model)
    for name, mod in model.named_modules():
        weight = float_weight(mod)
        if (name and type(mod) in supported and weight is not None and weight.numel() == 0
                and filter_reason(name, mod, flt, tied) is None):
            raise ValueError(f"layer '{name}' ({type(mod).__name__}): zero-size weight {list(weight.shape)}, "
                             f"nothing to quantize; leave it out with exclude=[{name!r}]")


def _is_weight_matrix_layer(mod: nn.Module) -> bool:
    """A module holding its own weight matrix (conv, embedding, custom GEMM), whatever its class
    and whether or not it has children (a "same padding" Conv2d keeping a ZeroPad2d inside), which
    users would expect a weight technique to consider; norms' 1-D scales are not such candidates.
    Layers prepared for QAT are reported by note_already_compressed instead."""
    from .qat.prepare import QATLinear

    weight = float_weight(mod)
    return weight is not None and weight.dim() >= 2 and not isinstance(mod, QATLinear)


def held_weights_reason(mod: nn.Module, not_handled: str = "this technique does not compress") -> Optional[str]:
    """Why a module with weight matrices but no `weight` layer rule stays float, or None: an
    LSTM's weight_ih_l0, nn.MultiheadAttention's packed in_proj_weight, a mixture of experts'
    stacked expert weights, a layer whose weight a parametrization computes. The Report lists
    them, so nothing that holds weights is left out of it silently."""
    from torch.nn.utils import parametrize

    if isinstance(mod, parametrize.ParametrizationList):
        return None  # reported as the layer it belongs to
    if parametrize.is_parametrized(mod):
        return (f"its weight is computed by a parametrization ({', '.join(mod.parametrizations)}: weight_norm, "
                f"spectral_norm, ...); remove it first (torch.nn.utils.parametrize.remove_parametrizations)")
    held = _held_weights(mod)
    if not held:
        return None
    if isinstance(mod, nn.MultiheadAttention):
        return ("MultiheadAttention multiplies by its packed in_proj_weight itself; torch's own class without "
                "hooks is unpacked into four linears (ts.unpack_attention)")
    reason = f"{type(mod).__name__} holds {', '.join(held)} as parameters of its own, which {not_handled}"
    if type(getattr(mod, "has_gate", None)) is bool:  # transformers' fused experts: why they stay so
        from .nn.expert_linears import ExpertLinears

        why = ExpertLinears.why_not(mod)
        reason += f" (fused experts kept fused: {why})" if why else ""
    return reason


def _held_weights(mod: nn.Module) -> List[str]:
    """Names of a module's own weight matrices other than `weight` (a layer the weight-layer rule
    reports, or a QAT one): named like weights or projections (not position tables or tokens),
    two dimensions past 1."""
    return [n for n, p in mod.named_parameters(recurse=False)
            if n != "weight" and ("weight" in n or n.endswith("proj")) and p.is_floating_point()
            and sum(d > 1 for d in p.shape) >= 2]


def held_weights_row(name: str, mod: nn.Module, not_handled: str = "this technique does not compress"):
    """The Report row of a module held_weights_reason explains, else None; its bytes are those
    of the weights it names (a parametrized layer: the whole layer)."""
    from torch.nn.utils import parametrize

    reason = held_weights_reason(mod, not_handled)
    if reason is None:
        return None
    held = set(_held_weights(mod))
    size = module_bytes(mod) if parametrize.is_parametrized(mod) else sum(
        p.numel() * p.element_size() for n, p in mod.named_parameters(recurse=False) if n in held)
    return LayerChange(name, type(mod).__name__, "skipped", bytes_before=size, reason=reason)


def check_not_a_single_layer(model: nn.Module, verb: str) -> None:
    """A verb replaces layers inside a model and cannot replace the object it was given: a bare
    nn.Linear (or conv, LSTM, nn.MultiheadAttention) passed as the model would come back
    unchanged with an empty Report. Say so instead."""
    if not isinstance(model, nn.Module):
        return  # the verb's own TypeError
    layer = _is_weight_matrix_layer(model) or isinstance(model, (nn.RNNBase, nn.MultiheadAttention))
    if layer and (next(model.children(), None) is None or isinstance(model, nn.MultiheadAttention)):
        raise ValueError(f"{verb}: the model is a single {type(model).__name__} layer, and {verb} replaces layers "
                         f"inside a model; wrap it (model = nn.Sequential(layer)) and use model[0] afterwards")


def adopt_float_dtype(old: nn.Module, new: nn.Module) -> None:
    """A compressed layer replacing a float one records that layer's weight dtype (what
    ts.summary's "before" counts) and, for fp16 / bf16, computes in it, as the same layer
    loaded from a file does (io._empty_like_saved)."""
    weight = old._parameters.get("weight")
    if weight is None or not weight.is_floating_point() or float_weight(new) is not None:
        return  # not a float layer, or a float one put back
    if getattr(new, "replaced_dtype", None) is None:
        object.__setattr__(new, "replaced_dtype", weight.dtype)
    if weight.dtype in (torch.float16, torch.bfloat16) and getattr(new, "compute_dtype", None) == torch.float32:
        new.to(weight.dtype)


@contextlib.contextmanager
def structure_restored_on_error(model: nn.Module):
    """A transform of several passes (W8A8: convs, then linears) that fails in a later pass
    leaves the model as it was: every module back under every name, each module's instance
    attributes (a fused forward, the skipped-layer record) as they were. The passes build new
    modules and leave the replaced ones' tensors alone, so the originals are intact."""
    modules = list(model.named_modules(remove_duplicate=False))
    children = [(parent, dict(parent._modules)) for parent in {id(m): m for _, m in modules}.values()]
    attrs = [(m, dict(m.__dict__)) for _, m in modules]
    try:
        yield
    except BaseException:
        for parent, kids in children:
            parent._modules.clear()
            parent._modules.update(kids)
        for m, state in attrs:
            for key in [k for k in m.__dict__ if k not in state]:
                del m.__dict__[key]
            m.__dict__.update({k: v for k, v in state.items() if not k.startswith("_modules")})
        raise


@contextlib.contextmanager
def swapped_while_running(state):
    """Yields `state` (attention.py's unpacked attentions, experts.py's unfused experts), whose
    swaps were made; on an error every one goes back (`state.restore_all()`)."""
    try:
        yield state
    except BaseException:
        state.restore_all()
        raise


def module_aliases(model: nn.Module) -> Dict[int, List[str]]:
    """{id(module): its names} of every module registered under more than one name, for a loop
    of _set_submodule calls (one scan of the model instead of one per call: a mixture-of-experts
    model has thousands of layers)."""
    names: Dict[int, List[str]] = collections.defaultdict(list)
    for n, m in model.named_modules(remove_duplicate=False):
        if n:
            names[id(m)].append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


def _set_submodule(model: nn.Module, name: str, new: nn.Module, aliases: Optional[Dict[int, List[str]]] = None
                   ) -> None:
    """Puts `new` at `name` and under every other name the module there is registered by (an
    alias, as T5's shared / encoder.embed_tokens): replaced under one name only, the alias kept
    the float module, which the forward went on using. A compressed replacement of a float
    layer adopts its dtype (adopt_float_dtype). aliases: module_aliases(model) made before a
    loop of these calls (kept up to date here), else the model is scanned for them."""
    old = model.get_submodule(name)
    adopt_float_dtype(old, new)
    name_layer(new, name)  # for its forward's errors
    new.train(old.training)  # a replacement in an eval model is in eval mode too
    if aliases is None:
        names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n] or [name]
    else:
        names = aliases.pop(id(old), [name])
        if len(names) > 1:
            aliases[id(new)] = names
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def factor_reason(owner: str, module: nn.Module) -> str:
    """Why a layer inside a compressed one (a factorized layer's factor) is left as it is."""
    return f"a factor of the already compressed layer '{owner}' ({type(module).__name__})"


def _enclosing(name: str, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The name of the module among `modules` that encloses `name` ("0" for "0.core"), if any."""
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules),
                None)


def replace_modules(
    model: nn.Module,
    flt: LayerFilter,
    supported: Tuple[type, ...],
    convert: Callable[[str, nn.Module], Tuple[nn.Module, str]],
    check: Callable[[str, nn.Module], Optional[str]],
    progress: bool = True,
    desc: str = "tensorslim",
) -> Report:
    """Replace every supported, selected layer by convert(name, module) -> (new, format).

    check(name, module) returns a reason to skip a layer the technique cannot handle
    (e.g. a shape the group size does not divide). Leaf modules of other types holding a
    weight matrix (convs, embeddings, ...) are reported as skipped, so nothing stays
    uncompressed silently.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tied = _tied_to_embedding(model)
    compressed = compressed_layers(model)  # their inner layers (a factorized conv's factors) are theirs
    todo: List[Tuple[str, nn.Module]] = []
    report = Report()
    for name, mod in model.named_modules():
        if not name:
            continue
        if type(mod) in supported:  # a factor of a factorized layer may be quantized, not factorized again
            reason = filter_reason(name, mod, flt, tied) or check(name, mod)
            if reason:
                report.changes.append(LayerChange(name, type(mod).__name__, "skipped",
                                                  bytes_before=module_bytes(mod), reason=reason))
            else:
                todo.append((name, mod))
        elif _is_weight_matrix_layer(mod):
            owner = _enclosing(name, compressed)
            reason = factor_reason(owner, compressed[owner]) if owner else \
                f"{type(mod).__name__} layers are not supported by this technique"
            report.changes.append(LayerChange(name, type(mod).__name__, "skipped",
                                              bytes_before=module_bytes(mod), reason=reason))
        elif (row := held_weights_row(name, mod)) is not None:
            report.changes.append(row)
    new_modules: Dict[str, nn.Module] = {}
    for name, mod in tqdm(todo, desc=desc, disable=not progress or len(todo) < 2, leave=False):
        try:
            new, fmt = convert(name, mod)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer '{name}' ({type(mod).__name__}): {e}") from e
        new_modules[name] = new
        report.changes.append(LayerChange(name, type(mod).__name__, "quantized", fmt,
                                          module_bytes(mod), module_bytes(new)))
    aliases = module_aliases(model)
    for name, new in new_modules.items():  # nothing above touched the model
        _set_submodule(model, name, new, aliases)
    remember_skipped(model, report)
    return report
