"""Weight (and activation) fake quantizers with straight-through estimators.

Each quantizer's forward returns exactly the weight the packed kernel will use after
ts.convert (same codes, same scales, same fp32 arithmetic as the ops' references), and
export() returns those codes and scales. Gradients (Bengio et al. 2013; BinaryConnect,
Courbariaux et al. 2015; XNOR-Net, Rastegari et al. 2016):
  integers: round() passes the gradient straight through; clamp() zeroes it outside
            [qmin, qmax]  (d w_q / d w = 1 inside the range, 0 outside)
  binary / ternary: d w_q / d w = scale where |w| <= 1, else 0 (BinaryConnect clipping)
  float formats (FP8 / NVFP4 / MXFP4): identity (with learnable scales, float_lsq.py:
            identity inside the representable range, zero where the value saturates)
Scales come from the weights (the same rule as post-training quantization) unless
`learnable=True`, where they are LSQ parameters initialized from that rule (the float
formats' learnable quantizers live in float_lsq.py).
"""
from typing import Dict, Optional

import torch
from torch import nn
import torch.nn.functional as F

from ..formats import FormatSpec
from ..ops.binary import _row_mean, binary_scales, ternary_codes_scales
from ..ops.lowbit import asymmetric_scale
from .lsq import effective_scale, lsq_gradient_scale


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ClippedSTE(torch.autograd.Function):
    """Forward: the given discrete values; backward: the gradient where |x| <= 1, else 0."""

    @staticmethod
    def forward(ctx, x, values):
        ctx.save_for_backward(x)
        return values

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype), None


class _ReplaceSTE(torch.autograd.Function):
    """Forward: `values` exactly; backward: identity to x."""

    @staticmethod
    def forward(ctx, x, values):
        return values

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, -1 elsewhere (the packing rule), clipped straight-through gradient."""
    return _ClippedSTE.apply(x, torch.where(x >= 0, 1.0, -1.0).to(x.dtype))


def span_scale(lo: torch.Tensor, hi: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """The format's scale of a range [lo, hi] (lo <= 0 <= hi): (hi - lo) / divisor with a zero
    point (through the core's rule, which divides each end first where hi - lo overflows fp32
    near +-3.4e38, so convert() packs what training saw), else max(-lo, hi) / divisor."""
    if not spec.has_zero_point:
        return torch.maximum(-lo, hi) / spec.scale_divisor
    return asymmetric_scale(lo, hi, spec.scale_divisor)


class WeightFakeQuant(nn.Module):
    """Base: forward(w) -> fake-quantized w; export(w) -> what convert() packs."""

    format_name = ""
    learnable = False

    def export(self, w: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"format={self.format_name}, learnable_scales={self.learnable}"


class IntFakeQuant(WeightFakeQuant):
    """N-bit integers in groups along the input dim, the rule of ops.quantize_reference:
    symmetric scale = amax / qmax-ish divisor; asymmetric (hi - lo) / (qmax - qmin) with a
    zero point; codes = clamp(round(w / scale) + zp, qmin, qmax)."""

    def __init__(self, spec: FormatSpec, group_size: int, weight: torch.Tensor, learnable: bool = False):
        super().__init__()
        out_features, in_features = weight.shape
        if group_size <= 0:  # any positive size: the last of ceil(in / group) groups may be short
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.spec, self.group_size, self.learnable = spec, group_size, learnable
        self.format_name = spec.name
        scale, zp = self._minmax(weight.detach())
        self.register_buffer("zero_point", zp)  # fixed (LSQ learns the scale only)
        if learnable:
            self.scale = nn.Parameter(scale)
            self.g = lsq_gradient_scale(min(group_size, in_features), spec.qmax)

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [out, groups, group]; a short last group is padded with zeros, which
        leave its range [min(w, 0), max(w, 0)] as it is (ungroup drops them again)."""
        cols = w.shape[1]
        gs = min(self.group_size, cols)
        pad = -cols % gs if gs else 0
        return F.pad(w.float(), (0, pad)).reshape(w.shape[0], -1, gs)

    @staticmethod
    def _ungroup(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v.reshape(w.shape[0], -1)[:, :w.shape[1]]

    def _minmax(self, w: torch.Tensor):
        g = self._grouped(w)
        zero = torch.zeros((), device=w.device)
        lo, hi = torch.minimum(g.amin(-1), zero), torch.maximum(g.amax(-1), zero)
        scale = span_scale(lo, hi, self.spec)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.spec.has_zero_point:
            zp = torch.round(-lo / scale).clamp(self.spec.qmin, self.spec.qmax)
        else:
            zp = torch.zeros_like(scale)
        return scale, zp

    def _scale_zp(self, w: torch.Tensor):
        if self.learnable:
            return effective_scale(self.scale, self.g), self.zero_point
        scale, zp = self._minmax(w.detach())
        return scale, zp

    def _codes(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        v = _RoundSTE.apply(self._grouped(w) / scale[..., None]) + zp[..., None]
        return v.clamp(self.spec.qmin, self.spec.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self._scale_zp(w)
        q = self._codes(w, scale, zp)
        return self._ungroup((q - zp[..., None]) * scale[..., None], w).to(w.dtype)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        scale, zp = self._scale_zp(w)
        codes = self._ungroup(self._codes(w, scale, zp), w).to(torch.int32)
        return {"codes": codes, "scales": scale.detach().clone(),
                "zero_points": zp.to(torch.uint8) if self.spec.has_zero_point else None}


class BinaryFakeQuant(WeightFakeQuant):
    """sign(w) x one scale per row: mean |w| (XNOR-Net) or a learned LSQ scale."""

    format_name = "binary"

    def __init__(self, weight: torch.Tensor, learnable: bool = False):
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.scale = nn.Parameter(binary_scales(weight))
            self.g = lsq_gradient_scale(weight.shape[1], 1)

    def _scale(self, w):
        return effective_scale(self.scale, self.g) if self.learnable else binary_scales(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (sign_ste(w.float()) * self._scale(w)[:, None]).to(w.dtype)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"positive": w >= 0, "scales": self._scale(w).detach().clone()}


class TernaryFakeQuant(WeightFakeQuant):
    """TWN codes {-1, 0, +1} (threshold 0.7 mean |w|) x one scale per row."""

    format_name = "ternary"

    def __init__(self, weight: torch.Tensor, learnable: bool = False):
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.scale = nn.Parameter(ternary_codes_scales(weight)[1])
            self.g = lsq_gradient_scale(weight.shape[1], 1)

    def _codes_scale(self, w):
        codes, scale = ternary_codes_scales(w)
        return codes, (effective_scale(self.scale, self.g) if self.learnable else scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, scale = self._codes_scale(w)
        wf = w.float()
        return (_ClippedSTE.apply(wf, codes.to(wf.dtype)) * scale[:, None]).to(w.dtype)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        codes, scale = self._codes_scale(w)
        return {"codes": codes, "scales": scale.detach().clone()}


class FloatFakeQuant(WeightFakeQuant):
    """FP8 / NVFP4 / MXFP4 through the format helper's reference quantizer (identity STE),
    scales from the weights; float_lsq.py has the learnable-scale versions. Holds only the
    format spec and group size (no module objects), so prepared models deep-copy and pickle."""

    def __init__(self, spec: FormatSpec, group_size: int):
        super().__init__()
        self.spec, self.group_size, self.format_name = spec, group_size, spec.name

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from ..ops import lowbit as lb  # present whenever the float formats are

        with torch.no_grad():
            q, scales, zps, ts = lb.quantize_lowbit_reference(w.detach().float(), self.spec, self.group_size)
            deq = lb.dequantize_lowbit_reference(q, scales, zps, ts, self.spec, self.group_size, w.shape[1])
        return _ReplaceSTE.apply(w, deq.to(w.dtype))

    def export(self, w: torch.Tensor) -> None:
        return None  # convert() keeps the PTQ module's own encoding, which is this one


class ActivationSignQuant(nn.Module):
    """XNOR-Net activations: sign(x) x mean |x| over the last dim, as linear_xnor computes them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        # the kernel's mean (float64, in index order), held constant in backward as the weight's
        # scale is: the straight-through gradient mean |x| where |x| <= 1 (docs/binary_qat.md)
        a_scale = _row_mean(x2.detach().abs())[:, None]
        return (sign_ste(x2) * a_scale).reshape(x.shape).to(x.dtype)
