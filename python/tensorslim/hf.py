"""Hugging Face transformers models: a compressed model saved with `model.save_pretrained(dir)`
loads back with transformers' own `AutoModelForCausalLM.from_pretrained(dir)` (through the
quantizer hf_quantizer.py registers) or with `ts.from_pretrained(AutoModelForCausalLM, dir)`.

A transformers model's config carries what its compressed layers are: every tensorslim verb
that changes layers (quantize, factorize, convert, load) writes
    config.quantization_config = {"quant_method": "tensorslim", "format_version": 1, "layers": {name: spec}}
(the same layer specs as a ts.save header), so save_pretrained's config.json holds them next to
the weights.
"""
import json
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from .meta_parameters import empty_parameters, take_meta_parameters

QUANT_METHOD = "tensorslim"
CONFIG_FORMAT_VERSION = 1


def _hf_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg if hasattr(cfg, "to_json_string") else None  # a transformers PretrainedConfig


def record_layers(model: nn.Module) -> None:
    """Write the model's compressed layer specs into its transformers config (no-op for other
    models). A model with no compressed layer left loses a tensorslim entry it had."""
    from .io import layer_specs

    cfg = _hf_config(model)
    if cfg is None:
        return
    layers = layer_specs(model)
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        head, table = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and table is not None and getattr(head, "weight", None) is not getattr(table, "weight", None):
            # a compressed head (or table) is no longer the other's tensor: from_pretrained must
            # not tie them (transformers' own route raised "`weight` is not an nn.Parameter")
            cfg.tie_word_embeddings = False
    ours = _ours(getattr(cfg, "quantization_config", None)) is not None
    if layers:
        cfg.quantization_config = {"quant_method": QUANT_METHOD, "format_version": CONFIG_FORMAT_VERSION,
                                   "layers": layers}
    elif ours:
        del cfg.quantization_config


def _ours(qcfg) -> Optional[dict]:
    """A tensorslim quantization_config as a dict (config.json gives a dict; transformers'
    from_pretrained leaves its config object), else None."""
    if hasattr(qcfg, "to_dict"):
        qcfg = qcfg.to_dict()
    return qcfg if isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD else None


def check_config(qcfg: dict, where) -> None:
    """A tensorslim quantization_config this version reads: an int version, and layer specs."""
    version = qcfg.get("format_version", 0)
    if type(version) is not int:
        raise ValueError(f"{where}: corrupt tensorslim quantization_config: format_version {version!r} is not an int")
    if version > CONFIG_FORMAT_VERSION:
        raise ValueError(f"{where}: tensorslim quantization_config version {version} is newer than this tensorslim "
                         f"reads ({CONFIG_FORMAT_VERSION}); upgrade tensorslim")
    layers = qcfg.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: corrupt tensorslim quantization_config: 'layers' must list the compressed "
                         f"layers, got {layers!r}")
    from .io import check_layer_specs

    check_layer_specs(layers, where)


def _read_weights(directory: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a save_pretrained directory: model.safetensors, or its shards."""
    from .io import read_file_tensors

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index: {e!r}") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        raise ValueError(f"{directory}: no model.safetensors (or its index); save with "
                         f"model.save_pretrained(dir) (safetensors, the default)")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_file_tensors(f))  # a ValueError naming the file where it is not readable
    return state


def _conversions(model: nn.Module):
    """(renames, merges): the transforms transformers' conversion mapping lists for the model
    (empty where this transformers has none)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(model)
    renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    return renames, [t for t in transforms if not isinstance(t, WeightRenaming)]


def checkpoint_renames(model: nn.Module, renames=None) -> Callable[[str], str]:
    """A saved tensor's name -> the model's name for it. transformers renames some models'
    tensors on save_pretrained (Mixtral's `mlp.` is `block_sparse_moe.` in its checkpoints) and
    back on from_pretrained; the renames its conversion mapping lists (or `renames`, those
    _conversions gave) are applied here."""
    renames = _conversions(model)[0] if renames is None else renames

    def rename(key: str) -> str:
        for t in renames:
            key, _ = t.rename_source_key(key)
        return key

    return rename


def _refuse_merged(merges, keys, directory) -> None:
    """ts.from_pretrained does not merge what transformers merges on load (`merges`, from
    _conversions: fused experts left uncompressed, saved one expert at a time): a clear error
    instead of a missing tensor."""
    merged = [k for k in keys if any(t.rename_source_key(k)[1] is not None for t in merges)]
    if merged:
        raise ValueError(f"{directory}: the checkpoint holds {merged[:2]}{' ...' if len(merged) > 2 else ''}, "
                         f"which transformers merges into the model's tensors on load (experts left fused, "
                         f"saved one expert at a time); ts.from_pretrained does not: load it with the model "
                         f"class's own from_pretrained(dir) (tensorslim's quantizer takes the compressed "
                         f"layers), or save with ts.save and load with ts.load")


def _build(cls, config) -> nn.Module:
    """A model of `config` in the config's dtype with its parameters on the meta device, built
    as transformers builds it (buffers it keeps in float32, such as rotary inv_freq, stay so; a
    whole-model .to(dtype) cast them and the outputs moved): Auto classes have from_config,
    model classes _from_config. Built whole, its fp32 weights were allocated and initialized
    only to be replaced (benchmarks/bench_memory.py, a 1.16 GiB fp32 model's INT4 file: process
    peak 2.09 GiB that way, 0.69 GiB this way)."""
    with empty_parameters():
        if hasattr(cls, "from_config"):
            return cls.from_config(config)
        if hasattr(cls, "_from_config"):
            return cls._from_config(config)
        return cls(config)


def from_pretrained(cls, directory: Union[str, Path], **config_kwargs) -> nn.Module:
    """Load a compressed transformers model saved with `model.save_pretrained(directory)`.

    cls: a transformers model class or Auto class (AutoModelForCausalLM, GPT2LMHeadModel, ...).
    The model is built from the directory's config, its compressed layers are replaced by
    empty compressed modules of the saved kinds, then every tensor of the directory's
    safetensors files is loaded strictly (weights tied in the model, saved once, are filled from
    their twin). Half-precision saves come back in their dtype. Returns the model in eval mode.
    """
    from transformers import AutoConfig, GenerationConfig

    from . import io

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"from_pretrained: {directory} is not a directory written by save_pretrained")
    config = AutoConfig.from_pretrained(str(directory), **config_kwargs)
    qcfg = _ours(getattr(config, "quantization_config", None))
    if qcfg is None:
        raise ValueError(f"{directory}: config.json has no tensorslim quantization_config: not saved from a "
                         f"model tensorslim compressed; load it with {getattr(cls, '__name__', cls)}.from_pretrained")
    check_config(qcfg, directory)
    model = _build(cls, config)  # compressed layers then compute in the float layers' dtype
    renames, merges = _conversions(model)
    rename = checkpoint_renames(model, renames)
    state = {rename(k): t for k, t in _read_weights(directory).items()}
    _refuse_merged(merges, state, directory)
    shapes = {k: (str(t.dtype), tuple(t.shape)) for k, t in state.items()}
    originals, replacements = io.plan_layers(model, qcfg["layers"], directory, shapes, on_meta=True)
    io.load_layers_and_state(model, originals, replacements, state, directory, fill_tied=True,
                             after_swap=lambda: take_meta_parameters(model, state))
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError):
        pass  # no generation_config.json: the one built from the config stays
    record_layers(model)
    return model.eval()
