"""`ts.prepare_qat(model, config)`: swap nn.Linear layers for fake-quantized QATLinear ones
so an ordinary training loop fine-tunes the model for the config's format."""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import config as cfgs
from ..config import Config, resolve_config
from ..layer_views import linear_views
from ..formats import FORMATS, integer_format
from ..pruning import masks
from ..report import Report, compressed_layers, note_already_compressed, warn_if_nothing_changed
from ..transforms import check_no_empty_layers, check_not_a_single_layer, replace_modules
from .fake_quant import (ActivationSignQuant, BinaryFakeQuant, FloatFakeQuant, IntFakeQuant,
                         TernaryFakeQuant, WeightFakeQuant)
from .float_lsq import learned_float_fake_quant

_INT_CONFIGS = (cfgs.Int8WeightOnly, cfgs.Int4WeightOnly, cfgs.IntWeightOnly)


def _float_format(cfg: Config) -> Optional[str]:
    """The float format a config stands for (FP8 / NVFP4 / MXFP4 configs, when the format
    helper's configs exist): a `format_name` (or `format`/`fmt`) naming a float row of the table."""
    for attr in ("format_name", "format", "fmt"):
        name = getattr(cfg, attr, None)
        if isinstance(name, str) and name in FORMATS and FORMATS[name].is_float:
            return name
    return None


def supported_configs() -> str:
    names = [c.__name__ for c in _INT_CONFIGS] + ["Binary", "Ternary"]
    return ", ".join(names) + " and float-format weight configs (FP8 / NVFP4 / MXFP4)"


def check_config(cfg: Config, learnable_scales: bool) -> None:
    """Raise a clear error for configs QAT cannot train."""
    if isinstance(cfg, _INT_CONFIGS):
        if getattr(cfg, "algorithm", "rtn") != "rtn":
            raise ValueError(f"prepare_qat: {type(cfg).__name__}(algorithm={cfg.algorithm!r}): QAT learns "
                             "the rounding itself and converts with round-to-nearest; use algorithm='rtn'")
        return
    if isinstance(cfg, (cfgs.Binary, cfgs.Ternary)):
        return
    if _float_format(cfg) is not None:
        return  # learnable or not: float_lsq handles the encoded E4M3 / E8M0 block scales
    raise TypeError(f"prepare_qat: {type(cfg).__name__} is not supported by QAT; supported: {supported_configs()}")


def make_weight_quantizer(cfg: Config, weight: torch.Tensor, learnable: bool) -> WeightFakeQuant:
    if isinstance(cfg, _INT_CONFIGS):
        spec = integer_format(cfg.bits, cfg.symmetric)
        return IntFakeQuant(spec, cfg.group_size or weight.shape[1], weight.detach(), learnable)
    if isinstance(cfg, cfgs.Binary):
        return BinaryFakeQuant(weight.detach(), learnable)
    if isinstance(cfg, cfgs.Ternary):
        return TernaryFakeQuant(weight.detach(), learnable)
    spec = FORMATS[_float_format(cfg)]
    group = getattr(cfg, "group_size", None) or spec.block_size or weight.shape[1]
    if learnable:
        return learned_float_fake_quant(spec, group, weight.detach())
    return FloatFakeQuant(spec, group)


class QATLinear(nn.Module):
    """nn.Linear whose forward uses the fake-quantized weight (and, for XNOR, binarized
    activations). Holds the original float weight and bias Parameters (the same objects,
    so an optimizer built before prepare_qat keeps working)."""

    def __init__(self, linear: nn.Linear, config: Config, learnable_scales: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.config = config
        self.weight_fake_quant = make_weight_quantizer(config, linear.weight, learnable_scales)
        binarize = isinstance(config, cfgs.Binary) and config.activations
        self.act_fake_quant = ActivationSignQuant() if binarize else None

    def fake_quantized_weight(self) -> torch.Tensor:
        return self.weight_fake_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fake_quant is not None:
            x = self.act_fake_quant(x)
        return F.linear(x, self.fake_quantized_weight(), self.bias)

    def describe(self) -> str:
        fq = self.weight_fake_quant
        act = " + binary activations" if self.act_fake_quant is not None else ""
        lsq = " (LSQ scales)" if fq.learnable else ""
        return f"{fq.format_name} fake-quant{act}{lsq}"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _check_layer(cfg: Config, name: str, mod: nn.Linear) -> Optional[str]:
    if not mod.weight.dtype.is_floating_point:
        return f"weight dtype {mod.weight.dtype} is not a float type"
    if mod.weight.device.type == "meta":
        return "weight is on the meta device (no data to train)"
    # Any in_features: integer configs keep ceil(in / group_size) groups and the float formats
    # (FP8 / NVFP4 / MXFP4) ceil(in / block) blocks, the last one short, as the packed layers do.
    return None


def prepare_qat(model: nn.Module, config, *, learnable_scales: bool = False, progress: bool = True) -> Report:
    """Make `model` quantization-aware for `config`, in place.

    Every selected nn.Linear (the config's include/exclude; the output head is skipped by
    default) becomes a QATLinear whose forward uses the fake-quantized weight with a
    straight-through estimator, so a normal training loop fine-tunes the model.
    learnable_scales=True makes the scales LSQ parameters initialized from the post-training
    rule (every format; float formats: qat/float_lsq.py, the forward uses the scales as the
    format stores them: E4M3 block scales for NVFP4, powers of two for MXFP4).
    Afterwards `ts.convert(model)` packs the layers. Returns a Report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat: expected a torch.nn.Module, got {type(model).__name__}")
    check_not_a_single_layer(model, "ts.prepare_qat")
    cfg = resolve_config(config)
    check_config(cfg, learnable_scales)
    prepared = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
    if prepared:
        raise ValueError(f"prepare_qat: the model is already prepared for QAT (layer '{prepared[0]}' is a "
                         f"QATLinear); call ts.convert(model) first or start from the float model")
    # each layer keeps the config it was prepared with; the layer filter has done its work, and
    # without filter_fn (often a lambda) the prepared model pickles
    layer_cfg = dataclasses.replace(cfg, filter_fn=None)

    def convert(name, mod):
        new = QATLinear(mod, layer_cfg, learnable_scales)
        if masks.is_masked(mod):  # a pruned layer stays pruned while it trains (the same weight)
            masks.attach(new, getattr(mod, masks.MASK), zero=False)
        return new, new.describe()

    # Conv1D and nn.Linear's equivalent subclasses as nn.Linear; attention stays packed (the
    # optimizer's parameters must stay the ones that train: ts.unpack_attention first)
    with linear_views(model, attention=False) as views:
        check_no_empty_layers(model, cfg)
        before = compressed_layers(model)
        report = replace_modules(model, cfg, (nn.Linear,), convert, lambda n, m: _check_layer(cfg, n, m),
                                 progress, desc="prepare QAT")
    masks.accept_saved_masks(model)  # a pruned QAT checkpoint (torch's state_dict) loads into it
    return warn_if_nothing_changed(views.name_rows(note_already_compressed(report, before)), "ts.prepare_qat")
