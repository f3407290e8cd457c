"""Compression recipes: a list of steps (prune, sparsify, factorize, quantize), each with its config,
applied to a model in order. `tensorslim compress RECIPE` runs one from a YAML or JSON file:

    model: tensorslim.eval.digits_cnn:DigitsResNet   # module:callable that builds the model
    weights: dense.safetensors                      # optional: its float weights (safetensors)
    calib: mypkg.data:calibration_batches           # optional: module:callable -> model inputs
    steps:
      - prune: {type: ChannelPrune, ratio: 0.5}
      - factorize: {type: Tucker, ratio: 0.5}       # convs: Tucker / CP; linears: SVD
      - quantize: int8_dynamic                      # a preset name, or {type: ..., ...}

A step's config is a dict as Config.to_dict() writes it (its "type" a config class name), or
a quantization preset name. Every step is checked before the first one runs, so a bad recipe
changes nothing.
"""
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .config import PRESETS, Config

STEP_KINDS = ("prune", "sparsify", "factorize", "quantize")


def _verb(kind: str) -> Callable:
    import tensorslim as ts
    return {"prune": ts.prune, "sparsify": ts.sparsify, "factorize": ts.factorize, "quantize": ts.quantize}[kind]


def _step_config(i: int, kind: str, spec: Any) -> Union[Config, str]:
    if kind == "quantize" and isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"recipe step {i} (quantize): unknown preset {spec!r}; "
                             f"known: {sorted(PRESETS)}")
        return spec
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"recipe step {i} ({kind}): expected a config dict with a 'type' "
                         f"(e.g. {{type: SVD, energy: 0.95}}), got {spec!r}")
    try:
        cfg = Config.from_dict(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"recipe step {i} ({kind}): {e}") from None
    if _kind_of(cfg) != kind:
        raise ValueError(f"recipe step {i} ({kind}): {type(cfg).__name__} is a {_kind_of(cfg)} config; "
                         f"write it as a '{_kind_of(cfg)}' step")
    return cfg


def _kind_of(cfg: Config) -> str:
    """The step (verb) a config belongs to."""
    import tensorslim as ts
    from .pruning.config import ChannelPrune, _Unstructured

    if isinstance(cfg, (ChannelPrune, _Unstructured)):
        return "prune"
    if isinstance(cfg, (ts.NM, ts.Unstructured, ts.SparseStorage)):
        return "sparsify"
    if isinstance(cfg, (ts.SVD, ts.Tucker, ts.CP)):
        return "factorize"
    return "quantize"


def parse_steps(steps: Any) -> List[Tuple[str, Union[Config, str]]]:
    """[(kind, config)] from a recipe's `steps`, every step checked."""
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"recipe: 'steps' must be a non-empty list, got {steps!r}")
    parsed = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise ValueError(f"recipe step {i}: expected one of {STEP_KINDS} mapped to its config, "
                             f"got {step!r}")
        (kind, spec), = step.items()
        if kind not in STEP_KINDS:
            raise ValueError(f"recipe step {i}: unknown step {kind!r}; expected one of {STEP_KINDS}")
        parsed.append((kind, _step_config(i, kind, spec)))
    return parsed


def apply_steps(model: nn.Module, steps: List[Tuple[str, Union[Config, str]]],
                calib_data: Optional[Iterable] = None, progress: bool = False) -> list:
    """Runs each step's verb on `model` in order; returns their Reports. ChannelPrune traces
    the model on the first calibration batch."""
    reports = []
    for kind, cfg in steps:
        kwargs = {"progress": progress}
        if calib_data is not None:
            kwargs["calib_data"] = calib_data
        reports.append(_verb(kind)(model, cfg, **kwargs))
    return reports


def load_recipe(path: Union[str, Path]) -> Dict[str, Any]:
    """A recipe file (YAML, or JSON) as a dict, its steps already checked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the recipe is not UTF-8 text ({e})") from None
    try:
        if path.suffix == ".json":
            recipe = json.loads(text)
        else:
            import yaml
            recipe = yaml.safe_load(text)
    except Exception as e:  # the parsers' own error types
        raise ValueError(f"{path}: not a valid recipe file: {e}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping with 'steps' (and 'model', 'weights', "
                         f"'calib'), got {type(recipe).__name__}")
    unknown = set(recipe) - {"model", "weights", "calib", "steps"}
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}")
    recipe["steps"] = parse_steps(recipe.get("steps"))
    return recipe


def resolve(target: str, what: str) -> Callable:
    """`module.path:callable` to the callable."""
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"{what}: expected 'module.path:callable', got {target!r}")
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValueError(f"{what}: expected 'module.path:callable', got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        # `python -m tensorslim` looks in the working directory first; the installed script did not
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise ValueError(f"{what}: cannot find {target!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ValueError(f"{what}: {target!r} is not callable")
    return fn


def build_model(recipe: Dict[str, Any]) -> nn.Module:
    """The recipe's model, with its float weights loaded when the recipe names a file."""
    make = resolve(recipe.get("model"), "model")
    try:
        model = make()
    except Exception as e:  # the user's code: any error, said in one line with where it came from
        raise ValueError(f"model: {recipe['model']!r}() raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: {recipe['model']!r} returned {type(model).__name__}, not a torch.nn.Module")
    if recipe.get("weights"):
        from safetensors.torch import load_file
        try:
            state = load_file(str(recipe["weights"]))
        except Exception as e:
            raise ValueError(f"{recipe['weights']}: cannot read the weights: {e}") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ValueError(f"{recipe['weights']}: does not match {recipe['model']}: {e}") from None
        if missing or unexpected:
            raise ValueError(f"{recipe['weights']}: does not match {recipe['model']}: missing "
                             f"{missing}, unexpected {unexpected}")
    return model.eval()


def calibration_batches(recipe: Dict[str, Any]) -> Optional[List[Any]]:
    if not recipe.get("calib"):
        return None
    got = resolve(recipe["calib"], "calib")()
    try:
        batches = list(got)
    except TypeError:
        raise ValueError(f"calib: {recipe['calib']!r} returned {type(got).__name__}, not an iterable of "
                         f"model inputs") from None
    if not batches:
        raise ValueError(f"calib: {recipe['calib']!r} gave no batches")
    return batches


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed buffers included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run(recipe_path: Union[str, Path], out: Union[str, Path], model_target: Optional[str] = None,
        weights: Optional[str] = None) -> Dict[str, int]:
    """Loads a recipe, builds the model, applies the steps and writes `out` with ts.save.
    Returns the model's bytes before and after."""
    from .io import _check_writable, save

    recipe = load_recipe(recipe_path)
    _check_writable(Path(out))  # before the steps run, not after
    if model_target:
        recipe["model"] = model_target
    if weights:
        recipe["weights"] = weights
    if not recipe.get("model"):
        raise ValueError("recipe: no model (give 'model: module:callable' or --model)")
    model = build_model(recipe)
    before = model_bytes(model)
    apply_steps(model, recipe["steps"], calibration_batches(recipe))  # taylor importance needs grads
    save(model, out)
    return {"bytes_before": before, "bytes_after": model_bytes(model)}
