"""`ts.convert(model)`: replace every QATLinear by the packed module with a real kernel,
holding exactly the codes and scales its fake quantizer used (learned LSQ scales too)."""
import dataclasses
from typing import Dict

import torch
from torch import nn

from ..formats import get_format
from ..hf import record_layers
from ..ops.binary import pack_signs, pack_trits
from ..quantization.registry import TRANSFORMS
from ..report import LayerChange, Report, module_bytes, remember_skipped
from ..transforms import _set_submodule
from .prepare import QATLinear


def _ptq_module(qat: QATLinear) -> nn.Module:
    """The module the config's own post-training transform builds from the trained weight
    (so convert produces whatever ts.quantize would: WeightOnlyLinear, BinaryLinear, ...)."""
    holder = nn.Module()
    holder.layer = nn.Linear(qat.in_features, qat.out_features, qat.bias is not None,
                             device=qat.weight.device)
    with torch.no_grad():
        holder.layer.weight.copy_(qat.weight.float())
        if qat.bias is not None:
            holder.layer.bias.copy_(qat.bias.float())
    cfg = dataclasses.replace(qat.config, include=(), exclude=(), skip_output_head=False, filter_fn=None)
    try:
        report = TRANSFORMS[type(cfg)](holder, cfg, forward_loop=None, progress=False)
    except (ValueError, TypeError) as e:  # drop the stand-in layer's name from the message
        raise type(e)(str(e.__cause__ or e)) from e
    if isinstance(holder.layer, nn.Linear):
        why = report.skipped[0].reason if report.skipped else "the transform left it unchanged"
        raise ValueError(f"cannot convert: {why}")
    return holder.layer


def _copy_into(buffer: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if buffer is None or tuple(buffer.shape) != tuple(value.shape) or buffer.dtype != value.dtype:
        got = None if buffer is None else (buffer.dtype, tuple(buffer.shape))
        raise ValueError(f"cannot convert: the packed module's {what} is {got}, the fake quantizer "
                         f"produced {(value.dtype, tuple(value.shape))}")
    buffer.copy_(value)


def _pack_int(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes in the format's layout: int8/uint8 as is, narrower ones as a little-endian bit
    stream (value i at bit i * bits; for 4 bits: low nibble first)."""
    spec = get_format(fmt)
    if spec.bits == 8:
        return codes.to(spec.code_dtype)
    from ..ops import lowbit  # bit-stream packer (its int4 layout equals pack_int4's)

    return lowbit.pack_bits(codes, spec.bits).view(spec.code_dtype)


def _with_learned_float(new: nn.Module, exported: Dict[str, torch.Tensor]) -> nn.Module:
    """LowBitLinear holding the codes packed under the learned scales, those scales as the
    format stores them (fp32 / E4M3 / E8M0 bytes) and NVFP4's tensor scale."""
    _copy_into(new.qweight, exported["qweight"], "qweight")
    _copy_into(new.scales, exported["scales"], "scales")
    if exported["tensor_scale"] is not None:
        _copy_into(new.tensor_scale, exported["tensor_scale"], "tensor_scale")
    return new


@torch.no_grad()
def _packed(qat: QATLinear) -> nn.Module:
    new = _ptq_module(qat)
    exported = qat.weight_fake_quant.export(qat.weight.detach())
    if exported is None:  # float formats: the PTQ encoding is the fake quantizer's
        return new
    if "qweight" in exported:  # float formats with learned scales: packed by the quantizer
        return _with_learned_float(new, exported)
    _copy_into(new.scales, exported["scales"].reshape(new.scales.shape).to(new.scales.dtype), "scales")
    fmt = qat.weight_fake_quant.format_name
    if "positive" in exported:
        q = pack_signs(exported["positive"])
    elif fmt == "ternary":
        q = pack_trits(exported["codes"])
    else:
        q = _pack_int(exported["codes"], fmt)
        if exported["zero_points"] is not None:
            _copy_into(new.zero_points, exported["zero_points"], "zero_points")
    _copy_into(new.qweight, q, "qweight")
    return new


def convert(model: nn.Module) -> Report:
    """Turn every QATLinear of a prepared model into its packed real-kernel module, in place.

    All replacements are built before any is swapped in, so an error leaves the model as
    it was. Returns a Report; ts.summary(model) lists the packed layers afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]
    if not todo:
        raise ValueError("convert: the model has no QAT layers; call ts.prepare_qat(model, config) "
                         "and train it first")
    new_modules: Dict[str, nn.Module] = {}
    report = Report()
    for name, qat in todo:
        try:
            new = _packed(qat)
        except (ValueError, TypeError) as e:
            raise type(e)(f"convert: layer '{name}': {e}") from e
        new_modules[name] = new
        fp32_bytes = 4 * (qat.weight.numel() + (qat.bias.numel() if qat.bias is not None else 0))
        report.changes.append(LayerChange(name, "QATLinear", "quantized", new.describe(), fp32_bytes,
                                          module_bytes(new)))
    for name, new in new_modules.items():
        _set_submodule(model, name, new)
    remember_skipped(model, report)
    record_layers(model)  # transformers models: the config describes the packed layers
    return report
