"""Learnable (LSQ) scales for the float formats: FP8 (E4M3 / E5M2), NVFP4 and MXFP4.

Each quantizer's forward is exactly the weight LowBitLinear decodes after ts.convert: the
element codes come from ops.lowbit.float_codes_with_scales under the scales *as the
format stores them* (fp32, E4M3 byte x fp32 tensor scale, E8M0 byte), and the decoded
values are multiplied by those scales in the dequantizer's order. Gradients:
  elements: straight through the format's rounding where |w / s| <= the format's max,
            zero where the value saturated (the float analogue of the integer clamp);
  scales:   LSQ (Esser et al. 2020): d w_q / d s = q - w/s inside, q (saturated) outside,
            times g = 1 / sqrt(N * max), see _lsq_g; across the rounding of a block
            scale to E4M3 / E8M0 the gradient passes straight through.
Parameters: FP8 and NVFP4 learn the scale as a clipping value `clip` = scale * max (the
magnitude mapped to the format's largest value; see _LearnedClip for why), MXFP4 learns
`log2_scale` (see MXFP4LSQFakeQuant).
"""
import math
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FormatSpec
from ..ops import lowbit
from .fake_quant import WeightFakeQuant, _ReplaceSTE
from .lsq import effective_scale, lsq_gradient_scale

E4M3_MAX = 448.0


def _lsq_g(numel_per_scale: int, spec: FormatSpec) -> float:
    """LSQ's g = 1 / sqrt(N * Q_P). For integers Q_P is the largest code, i.e. the largest
    |w / s| the format represents. For a float format that role is played by its largest
    finite value (448 for E4M3, 57344 for E5M2, 6 for E2M1): w / s spans [-max, max] the
    way integer codes span [-Q_P, Q_P], so s ~ |w| / max as s ~ |w| / Q_P for integers,
    and the same g keeps scale and weight updates of comparable relative size. (The
    number of codes, 2^bits, would over-count: float codes are not evenly spaced.)"""
    return lsq_gradient_scale(numel_per_scale, spec.max_value)


class _SaturatingRoundSTE(torch.autograd.Function):
    """Forward: `values` (v rounded to the format, saturating); backward: identity where
    |v| <= limit (inside the representable range), zero where v saturated."""

    @staticmethod
    def forward(ctx, v, values, limit: float):
        ctx.save_for_backward(v)
        ctx.limit = limit
        return values

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * (v.abs() <= ctx.limit).to(grad.dtype), None, None


class _Scales(NamedTuple):
    divisor: torch.Tensor  # [rows, groups] fp32 scale the elements are divided by (autograd)
    factors: List[torch.Tensor]  # what the decoded values are multiplied by, in the dequantizer's order
    stored: torch.Tensor  # the scales as packed: fp32, or E4M3 / E8M0 bytes (detached)
    tensor_scale: Optional[torch.Tensor]  # NVFP4's fp32 [1] (detached), else None


class LearnedFloatFakeQuant(WeightFakeQuant):
    """Base of the learnable float quantizers: subclasses say how the learned parameter
    becomes the stored scales (_scales)."""

    learnable = True

    def __init__(self, spec: FormatSpec, group_size: int, weight: torch.Tensor):
        super().__init__()
        if group_size <= 0:
            raise ValueError(f"{spec.name}: group_size must be positive, got {group_size}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{spec.name}: the weight contains NaN or Inf; learnable scales are "
                             "initialized from finite weights")
        self.spec, self.group_size, self.format_name = spec, group_size, spec.name

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """[rows, groups, group]: ceil(in / group) groups, the short last one zero-padded (zeros
        leave a group's amax as it is; forward cuts them off again)."""
        groups = -(-w.shape[1] // self.group_size)
        return F.pad(w.float(), (0, groups * self.group_size - w.shape[1])).reshape(w.shape[0], groups, self.group_size)

    def _scales(self) -> _Scales:
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        sc = self._scales()
        v = self._grouped(w) / sc.divisor[..., None]
        with torch.no_grad():
            codes = lowbit.float_codes_with_scales(w.detach().float(), self.spec, sc.stored,
                                                   sc.tensor_scale, self.group_size)
            values = self._grouped(lowbit.decode_table(self.spec, w.device)[codes.long()])
        out = _SaturatingRoundSTE.apply(v, values, self.spec.max_value)
        for f in sc.factors:  # same fp32 products, same order as dequantize_lowbit_reference
            out = out * (f[..., None] if f.dim() else f)
        return out.flatten(1)[:, : w.shape[1]].to(w.dtype)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The packed codes under the learned scales, the stored scales and tensor scale."""
        sc = self._scales()
        q = lowbit.quantize_lowbit_with_scales(w.detach().float(), self.spec.name, sc.stored,
                                               sc.tensor_scale, self.group_size)
        return {"qweight": q, "scales": sc.stored.clone(),
                "tensor_scale": None if sc.tensor_scale is None else sc.tensor_scale.clone()}

    @torch.no_grad()
    def stored_scales(self):
        """(scales as the packed module stores them, tensor scale or None)."""
        sc = self._scales()
        return sc.stored.clone(), sc.tensor_scale


def _clip_g(numel_per_scale: int, spec: FormatSpec) -> float:
    """Gradient factor for a clip parameter c = s * max (see _LearnedClip): LSQ balances
    |grad_s| / s against |grad_w| / |w|; grad_c / c = (grad_s / s) / max^2, so the factor
    that gives s exactly LSQ's SGD update is g * max^2."""
    return _lsq_g(numel_per_scale, spec) * spec.max_value ** 2


class _LearnedClip(LearnedFloatFakeQuant):
    """The learned scale s held as the clipping value c = s * max (the magnitude mapped to
    the format's largest value; PTQ's amax at initialization, so s = c / max is bit for bit
    the PTQ scale). Same scale, other units, chosen for Adam: its steps are about lr in the
    parameter's units whatever the gradient, and the FP8 scale amax / 448 (~1e-3 for
    weights ~0.5, ~1e-5 for E5M2) would move by 100% per step at lr 1e-3. (Measured on the
    digits example: E4M3 with the raw scale as parameter fell to 28% accuracy, 97% with
    the clip.) c is on the weights' own scale, so both move at comparable relative rates."""

    def __init__(self, spec: FormatSpec, group_size: int, weight: torch.Tensor):
        super().__init__(spec, group_size, weight)
        amax = self._grouped(weight.detach()).abs().amax(-1)
        # an all-zero group: PTQ's scale 1, i.e. a clip of max
        self.clip = nn.Parameter(torch.where(amax > 0, amax, torch.full_like(amax, spec.max_value)))
        self.g = _clip_g(group_size, spec)

    def _clip(self) -> torch.Tensor:
        # clamped positive, LSQ-scaled gradient; in fp32 as the format stores its scales, also
        # after the model was cast to half precision (the forward then uses what convert stores)
        return effective_scale(self.clip, self.g).float()


class FP8LSQFakeQuant(_LearnedClip):
    """FP8 E4M3 / E5M2 with one learned fp32 scale per row or group, scale = clip / max
    (the packed scale is fp32, so it is stored as is); PTQ's amax / max at initialization."""

    def _scales(self) -> _Scales:
        s = self._clip() / self.spec.max_value
        return _Scales(s, [s], s.detach(), None)


class NVFP4LSQFakeQuant(_LearnedClip):
    """NVFP4 with a learned scale per block of 16, scale = clip / 6; PTQ's amax / 6 at
    initialization.

    What the format stores, and so what the forward uses, is the E4M3 byte of
    scale / tensor_scale times the fp32 tensor scale; the rounding to E4M3 is passed
    straight through. The tensor scale is recomputed from the learned scales with the PTQ
    rule itself: PTQ's amax / (6 * 448) is the largest block scale amax_b / 6 over 448, so
    here it is max(clip) / (6 * 448) (a constant for the gradient); at initialization it is
    PTQ's tensor scale bit for bit. The largest block thus always gets E4M3's top value, as
    in PTQ, and no block scale can saturate; with the tensor scale frozen at prepare time,
    a block whose scale should grow past the initial maximum would be clipped at
    448 * tensor_scale, with no gradient to bring it back. A block scale never rounds to
    zero: below E4M3's smallest value 2^-9 it stays at 2^-9. (PTQ gives a block more than
    2^10 * 448 times smaller than the largest one a zero scale and zero codes; the only
    case where the initial encoding differs from PTQ's.)
    """

    def __init__(self, spec: FormatSpec, weight: torch.Tensor):
        super().__init__(spec, spec.block_size, weight)

    def _scales(self) -> _Scales:
        c = self._clip()
        t = (c.detach().max() / (self.spec.max_value * E4M3_MAX)).reshape(1)
        ratio = c / self.spec.max_value / t  # PTQ's amax / 6 / t
        with torch.no_grad():
            stored = lowbit.e4m3_encode(ratio.clamp(lowbit.E4M3_MIN_SUBNORMAL, E4M3_MAX)).to(torch.uint8)
        block = _ReplaceSTE.apply(ratio, lowbit.e4m3_decode(stored))  # straight through the rounding
        t0 = t.reshape(())
        return _Scales(block * t0, [block, t0], stored, t)


class _Pow2STE(torch.autograd.Function):
    """Forward: the power of two `scale` = 2^round(log2_scale) as E8M0 stores it; backward
    (straight through the rounding): g * dL/ds / (s ln 2), i.e. LSQ's scale gradient
    expressed in log2 units, so that an SGD step on log2_scale changes s relatively as
    much as LSQ's SGD step on s would (ds / s = ln 2 d log2_scale). The plain chain rule
    would give dL/ds * s ln 2, ~2^-6 smaller for weights ~0.1 and down at Adam's eps.
    s is floored at 2^-64 here so nearly-empty blocks cannot overflow the gradient."""

    @staticmethod
    def forward(ctx, log2_scale, scale, g: float):
        ctx.save_for_backward(scale)
        ctx.g = g
        return scale

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * (ctx.g / math.log(2)) / scale.clamp_min(2.0 ** -64), None, None


class MXFP4LSQFakeQuant(LearnedFloatFakeQuant):
    """MXFP4 with a learned log2 scale per block of 32: the forward uses 2^round(log2_scale)
    (the E8M0 byte is round(log2_scale) + 127, half to even), gradients as _Pow2STE says.
    Initialized to the PTQ exponent floor(log2 amax) - 2.

    Why log2 rather than the scale itself: E8M0 stores an exponent, so the parameter lives
    where the format does; its rounding grid is evenly spaced (a boundary 0.5 either side
    of every exponent) and an optimizer step is a relative change whatever the weights'
    magnitude, whereas in the linear domain the boundaries 2^(k +- 1/2) widen with the
    scale, so one learning rate jumps small scales across many octaves and never moves
    large ones; positivity needs no clamp. The price: with Adam at lr 1e-3 an exponent
    needs ~500 steps to move by one, so give these parameters a larger learning rate
    (e.g. 1e-2) when the fine-tune is short.
    """

    def __init__(self, spec: FormatSpec, weight: torch.Tensor):
        super().__init__(spec, spec.block_size, weight)
        amax = self._grouped(weight.detach()).abs().amax(-1)
        e = torch.where(amax > 0, torch.frexp(amax).exponent - 3, torch.full_like(amax, -127, dtype=torch.int32))
        self.log2_scale = nn.Parameter(e.clamp(-127, 127).float())
        self.g = _lsq_g(spec.block_size, spec)

    def _scales(self) -> _Scales:
        with torch.no_grad():
            stored = (torch.round(self.log2_scale).clamp(-127, 127) + 127).to(torch.uint8)
        scale = _Pow2STE.apply(self.log2_scale, lowbit.e8m0_decode(stored), self.g)
        return _Scales(scale, [scale], stored, None)


def learned_float_fake_quant(spec: FormatSpec, group_size: int, weight: torch.Tensor) -> LearnedFloatFakeQuant:
    if spec.name == "nvfp4":
        return NVFP4LSQFakeQuant(spec, weight)
    if spec.name == "mxfp4":
        return MXFP4LSQFakeQuant(spec, weight)
    if spec.name in ("fp8_e4m3", "fp8_e5m2"):
        return FP8LSQFakeQuant(spec, group_size, weight)
    raise ValueError(f"learnable scales: no LSQ quantizer for float format {spec.name}")
