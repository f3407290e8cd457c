"""Binary and ternary weights: packing, and the binary / XNOR / ternary linears.

Packing (the C++ kernels read exactly this; see docs/binary_qat.md):
  binary:  1 bit per weight, bit 1 = +1, bit 0 = -1 (w >= 0 -> +1), least significant
           bit first, rows padded to whole bytes: [N, ceil(K / 8)] uint8.
  ternary: 2-bit two's complement codes +1 = 0b01, 0 = 0b00, -1 = 0b11, four per byte,
           lowest bits first: [N, ceil(K / 4)] uint8.
  scales:  one fp32 per output row. Binary (XNOR-Net, Rastegari et al. 2016): mean |w|.
           Ternary (TWN, Li & Liu 2016): threshold 0.7 * mean |w|, scale = mean |w| over
           the weights above it.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _views
from .._native import _C
from .weight_only import BACKENDS, _check_backend

TWN_THRESHOLD = 0.7  # ternary threshold as a fraction of mean |w| (TWN's approximation)

_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


# ---------------------------------------------------------------- packing (plain PyTorch)


def _check_matrix(w: torch.Tensor, what: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [out_features, in_features] tensor, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{what}: expected a float tensor, got {w.dtype}")
    if w.numel() and not torch.isfinite(w).all():
        raise ValueError(f"{what}: contains NaN or Inf")


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """[N, K] bool (True = +1) -> [N, ceil(K/8)] uint8, LSB first."""
    n, k = positive.shape
    b = F.pad(positive.to(torch.int32), (0, (-k) % 8)).reshape(n, -1, 8)
    return (b * _BIT_WEIGHTS.to(b.device)).sum(-1).to(torch.uint8)


def unpack_signs(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """[N, bytes] uint8 -> [N, cols] float32 of +-1."""
    b = (bits.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=bits.device)) & 1
    return (2 * b.reshape(bits.shape[0], -1)[:, :cols] - 1).float()


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """[N, K] integer tensor of {-1, 0, +1} -> [N, ceil(K/4)] uint8 2-bit codes."""
    n, k = t.shape
    c = F.pad(t.to(torch.int32) & 3, (0, (-k) % 4)).reshape(n, -1, 4)
    return (c << torch.arange(0, 8, 2, device=t.device, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_trits(codes: torch.Tensor, cols: int) -> torch.Tensor:
    """[N, bytes] uint8 -> [N, cols] float32 of {-1, 0, +1} (the unused code 0b10 reads as 0)."""
    c = (codes.to(torch.int32).unsqueeze(-1) >> torch.arange(0, 8, 2, device=codes.device)) & 3
    c = c.reshape(codes.shape[0], -1)[:, :cols]
    return ((c == 1).float() - (c == 3).float())


def _row_mean(a: torch.Tensor) -> torch.Tensor:
    """Mean over each row, summed in float64 in index order (the C++ order), as fp32."""
    return (a.double().cumsum(dim=1)[:, -1] / a.shape[1]).float()


def binary_scales(w: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's per-row scale: mean |w| (the L2-optimal scale for sign(w))."""
    return _row_mean(w.detach().float().abs())


def ternary_codes_scales(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """TWN: t = 0.7 mean|w| per row; code = sign(w) where |w| > t, else 0;
    scale = mean |w| over the non-zero codes (0 for a row without any)."""
    a = w.detach().float().abs()
    keep = a > torch.tensor(TWN_THRESHOLD, dtype=torch.float32) * _row_mean(a)[:, None]
    count = keep.sum(dim=1)
    kept_sum = (a * keep).double().cumsum(dim=1)[:, -1]
    scales = torch.where(count > 0, (kept_sum / count.clamp_min(1)).float(), torch.zeros((), dtype=torch.float32))
    codes = torch.where(keep, torch.where(w >= 0, 1, -1), 0).to(torch.int32)
    return codes, scales


def binarize(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A float [N, K] weight -> (bits [N, ceil(K/8)] uint8, scales [N] fp32)."""
    _check_matrix(w, "weight")
    return pack_signs(w >= 0), binary_scales(w)


def ternarize(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A float [N, K] weight -> (codes [N, ceil(K/4)] uint8, scales [N] fp32)."""
    _check_matrix(w, "weight")
    codes, scales = ternary_codes_scales(w)
    return pack_trits(codes), scales


# ---------------------------------------------------------------- custom ops


def _run(native_fn, x, w, scales, bias, backend):
    """Output allocated here, filled by a native linear (binary, XNOR or ternary)."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    native_fn(_views.view(x, "x"), _views.view(w, "qweight"), _views.view(scales, "scales"),
              _views.optional_view(bias, "bias"), _views.view(out, "out"), backend)
    return out


@torch.library.custom_op("tensorslim::linear_binary", mutates_args=(), device_types="cpu")
def _linear_binary(x: torch.Tensor, bits: torch.Tensor, scales: torch.Tensor,
                   bias: Optional[torch.Tensor], backend: int) -> torch.Tensor:
    return _run(_C.linear_binary, x, bits, scales, bias, backend)


@torch.library.custom_op("tensorslim::linear_xnor", mutates_args=(), device_types="cpu")
def _linear_xnor(x: torch.Tensor, bits: torch.Tensor, scales: torch.Tensor,
                 bias: Optional[torch.Tensor], backend: int) -> torch.Tensor:
    return _run(_C.linear_xnor, x, bits, scales, bias, backend)


@torch.library.custom_op("tensorslim::linear_ternary", mutates_args=(), device_types="cpu")
def _linear_ternary(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    bias: Optional[torch.Tensor], backend: int) -> torch.Tensor:
    return _run(_C.linear_ternary, x, codes, scales, bias, backend)


for _op in (_linear_binary, _linear_xnor, _linear_ternary):
    _op.register_fake(lambda x, w, scales, bias, backend: x.new_empty(x.shape[0], w.shape[0]))


# ---------------------------------------------------------------- references (plain PyTorch)


def binary_linear_reference(x, bits, scales, bias, in_features):
    w = unpack_signs(bits, in_features) * scales[:, None]
    return F.linear(x.float(), w, bias)


def ternary_linear_reference(x, codes, scales, bias, in_features):
    w = unpack_trits(codes, in_features) * scales[:, None]
    return F.linear(x.float(), w, bias)


def binarize_activations(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of x -> (+-1 signs, mean |x| per row), as the XNOR kernel binarizes them."""
    xf = x.float()
    a_scale = _row_mean(xf.abs()) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    return torch.where(xf >= 0, 1.0, -1.0), a_scale


def xnor_linear_reference(x, bits, scales, bias, in_features):
    """Bit for bit what the kernel computes: exact integer dots, then (dot * a_scale) * scale + bias."""
    signs, a_scale = binarize_activations(x)
    dots = (signs.double() @ unpack_signs(bits, in_features).double().T).float()  # exact integers
    y = dots * a_scale[:, None] * scales[None, :]
    return y + bias if bias is not None else y


# ---------------------------------------------------------------- public functions

_KERNELS = {"binary": (_linear_binary, binary_linear_reference, 8),
            "xnor": (_linear_xnor, xnor_linear_reference, 8),
            "ternary": (_linear_ternary, ternary_linear_reference, 4)}


def _linear(kind: str, x, qweight, scales, bias, in_features: int, backend: str):
    op, reference, per_byte = _KERNELS[kind]
    _check_backend(backend)
    if backend == "onednn":
        raise ValueError(f"{kind} linear: oneDNN has no binary/ternary kernel; use auto, native or reference")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{kind} linear: x must be a float tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{kind} linear: x: expected last dimension {in_features}, got shape {tuple(x.shape)}")
    want = (in_features + per_byte - 1) // per_byte
    if qweight.dim() != 2 or qweight.shape[1] != want or qweight.dtype != torch.uint8:
        raise ValueError(f"{kind} linear: qweight: expected uint8 [out_features, {want}], got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if scales.shape != (n,) or scales.dtype != torch.float32:
        raise ValueError(f"{kind} linear: scales: expected float32 [{n}], got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32):
        raise ValueError(f"{kind} linear: bias: expected float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).float()
    if backend == "reference":
        y = reference(x2, qweight, scales, bias, in_features)
    else:
        y = op(x2.contiguous(), qweight, scales, bias, BACKENDS[backend])
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


def binary_linear(x: torch.Tensor, bits: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                  in_features: int, backend: str = "auto") -> torch.Tensor:
    """y = x @ (sign * scale).T + bias with packed sign bits; x is [..., in_features]."""
    return _linear("binary", x, bits, scales, bias, in_features, backend)


def xnor_linear(x: torch.Tensor, bits: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                in_features: int, backend: str = "auto") -> torch.Tensor:
    """XNOR-Net: x is binarized per row (signs, mean |x|) and multiplied by popcount."""
    return _linear("xnor", x, bits, scales, bias, in_features, backend)


def ternary_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                   in_features: int, backend: str = "auto") -> torch.Tensor:
    """y = x @ (trit * scale).T + bias with packed 2-bit codes; x is [..., in_features]."""
    return _linear("ternary", x, codes, scales, bias, in_features, backend)
