"""W8A8: activation quantization (per token or static) and the INT8 x INT8 -> INT32 GEMM
with a fused rescale. The specification is in include/tensorslim/gemm_int8.h; the
*_reference functions below implement it in plain PyTorch, bit for bit for the codes.

Activations are quantized along their last dimension (K), optionally multiplied first by
SmoothQuant's inverse smoothing factors (`inv_smooth`, [K]), which the kernel fuses.
"""
import functools
from typing import Optional, Tuple

import torch

from .. import _views
from ..config import check_weight_qmax
from . import _eager, weight_only
from .._native import _C

INT8_BACKENDS = {"auto": 0, "reference": 1, "native": 2, "onednn": 3}


def _check_backend(backend: str) -> None:
    if backend not in INT8_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(INT8_BACKENDS)}")


def _check_x(x: torch.Tensor, inv_smooth: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected float32 activations, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [tokens, features] tensor, got shape {tuple(x.shape)}")
    _check_inv_smooth(inv_smooth, x.shape[1])


def _check_inv_smooth(inv_smooth: Optional[torch.Tensor], K: int) -> None:
    if inv_smooth is not None and (inv_smooth.dtype != torch.float32 or inv_smooth.shape != (K,)):
        raise ValueError(f"inv_smooth: expected a float32 tensor of shape [{K}], got "
                         f"{inv_smooth.dtype} {tuple(inv_smooth.shape)}")


def _check_finite(x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"x contains NaN or Inf (row {row}); activation quantization needs finite values")


# ---------------------------------------------------------------- per-token (dynamic)


def _quantize_per_token_impl(x: torch.Tensor, inv_smooth: Optional[torch.Tensor], unsigned: bool,
                        backend: int) -> Tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.uint8 if unsigned else torch.int8)
    scales = torch.empty(x.shape[0], dtype=torch.float32)
    _C.quantize_per_token(_views.view(x, "x"), _views.optional_view(inv_smooth, "inv_smooth"),
                          _views.view(q, "q"), _views.view(scales, "scales"), backend)
    return q, scales


_quantize_per_token = torch.library.custom_op("tensorslim::quantize_per_token", mutates_args=(),
                                   device_types="cpu")(_quantize_per_token_impl)


@_quantize_per_token.register_fake
def _quantize_per_token_fake(x, inv_smooth, unsigned, backend):
    return x.new_empty(x.shape, dtype=torch.uint8 if unsigned else torch.int8), x.new_empty(x.shape[0])


def quantize_per_token(x: torch.Tensor, inv_smooth: Optional[torch.Tensor] = None,
                       backend: str = "auto", unsigned: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [M, K] and one fp32 scale per row [M] (max |x| / 127).
    unsigned=True returns the same codes + 128 as uint8 (zero point 128), the form the
    packed-weight GEMM takes."""
    _check_backend(backend)
    _check_x(x, inv_smooth)
    if backend == "reference":
        return quantize_per_token_reference(x, inv_smooth, unsigned)
    return _eager.call(_quantize_per_token, _quantize_per_token_impl, x.contiguous(), inv_smooth,
                       bool(unsigned), INT8_BACKENDS[backend])


def quantize_per_token_reference(x: torch.Tensor, inv_smooth: Optional[torch.Tensor] = None,
                                 unsigned: bool = False):
    xs = x * inv_smooth if inv_smooth is not None else x
    _check_finite(xs)
    amax = xs.abs().amax(dim=1) if xs.shape[1] else torch.zeros(xs.shape[0])
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(xs / scales[:, None]).clamp(-127, 127)
    return (q + 128).to(torch.uint8) if unsigned else q.to(torch.int8), scales


# ---------------------------------------------------------------- static (calibrated)


def _quantize_static_impl(x: torch.Tensor, inv_smooth: Optional[torch.Tensor], scale: float,
                     zero_point: int, unsigned: bool, backend: int) -> torch.Tensor:
    q = torch.empty(x.shape, dtype=torch.uint8 if unsigned else torch.int8)
    _C.quantize_static(_views.view(x, "x"), _views.optional_view(inv_smooth, "inv_smooth"),
                       float(scale), int(zero_point), _views.view(q, "q"), backend)
    return q


_quantize_static = torch.library.custom_op("tensorslim::quantize_static", mutates_args=(),
                                   device_types="cpu")(_quantize_static_impl)


@_quantize_static.register_fake
def _quantize_static_fake(x, inv_smooth, scale, zero_point, unsigned, backend):
    return x.new_empty(x.shape, dtype=torch.uint8 if unsigned else torch.int8)


def _check_static(scale: float, zero_point: int, dtype: torch.dtype) -> float:
    """The static quantizer's parameters, checked; returns the scale as a float."""
    if dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"quantize_static: dtype must be torch.uint8 or torch.int8, got {dtype}")
    scale = float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"quantize_static: scale must be finite and > 0, got {scale}")
    lo, hi = (0, 255) if dtype == torch.uint8 else (0, 0)
    if not lo <= int(zero_point) <= hi:
        raise ValueError(f"quantize_static: zero_point {zero_point} is out of range [{lo}, {hi}] for {dtype}")
    return scale


def quantize_static(x: torch.Tensor, scale: float, zero_point: int = 0,
                    inv_smooth: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.uint8,
                    backend: str = "auto") -> torch.Tensor:
    """Codes clamp(round(x / scale) + zero_point) as uint8 (asymmetric) or int8 (zero point 0)."""
    _check_backend(backend)
    _check_x(x, inv_smooth)
    scale = _check_static(scale, zero_point, dtype)
    if backend == "reference":
        return quantize_static_reference(x, scale, int(zero_point), inv_smooth, dtype)
    return _eager.call(_quantize_static, _quantize_static_impl, x.contiguous(), inv_smooth, scale,
                       int(zero_point), dtype == torch.uint8, INT8_BACKENDS[backend])


def quantize_static_reference(x, scale: float, zero_point: int, inv_smooth=None, dtype=torch.uint8):
    xs = x * inv_smooth if inv_smooth is not None else x
    _check_finite(xs)
    lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
    s = torch.tensor(scale, dtype=torch.float32)
    return (torch.round(xs / s) + zero_point).clamp(lo, hi).to(dtype)


# ---------------------------------------------------------------- weights


def weight_codes(w: torch.Tensor, qmax: int = 127) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8 codes of w [out, in] in [-qmax, qmax] and their fp32 scales
    [out, 1]: the int8 format's quantizer for qmax 127, else scale = max|row| / qmax (1.0 for a
    zero row) and codes rne(w / scale) (docs/formats.md, W8A8 layers). qmax 64 keeps a pair of
    u8 x s8 products inside int16: CPUs without VNNI then multiply exactly (docs/w8a8.md)."""
    check_weight_qmax(qmax, "weight_codes")
    if qmax == 127:
        q, scales, _ = weight_only.quantize(w, "int8", w.shape[1])
        return q, scales
    weight_only.check_finite_rows(w)
    amax = w.abs().amax(dim=1, keepdim=True) if w.shape[1] else torch.zeros(w.shape[0], 1)
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(w / scales).clamp(-qmax, qmax).to(torch.int8), scales


def codes_within_64(qweight: torch.Tensor) -> bool:
    """Whether every INT8 weight code lies in [-64, 64] (weight_qmax=64)."""
    lo, hi = torch.aminmax(qweight)
    return bool(lo >= -64 and hi <= 64)


# ---------------------------------------------------------------- INT8 GEMM


def _linear_int8_impl(qx: torch.Tensor, act_scales: torch.Tensor, act_zero_point: int, qweight: torch.Tensor,
                 w_scales: torch.Tensor, bias: Optional[torch.Tensor], backend: int,
                 packed: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(qx.shape[0], qweight.shape[0], dtype=torch.float32)
    _C.linear_int8(_views.view(qx, "qx"), _views.view(act_scales, "act_scales"), int(act_zero_point),
                   _views.view(qweight, "qweight"), _views.view(w_scales, "w_scales"),
                   _views.optional_view(bias, "bias"), _views.view(out, "out"), backend,
                   _views.optional_view(packed, "packed"))
    return out


_linear_int8 = torch.library.custom_op("tensorslim::linear_int8", mutates_args=(),
                                   device_types="cpu")(_linear_int8_impl)


@_linear_int8.register_fake
def _linear_int8_fake(qx, act_scales, act_zero_point, qweight, w_scales, bias, backend, packed):
    return qx.new_empty(qx.shape[0], qweight.shape[0], dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _packing_pays(isa: str) -> bool:
    return bool(_C.linear_int8_packing_pays())


def packing_pays() -> bool:
    """Whether a layer should keep pack_int8_weight's copy under the active ISA (not on AMX
    CPUs, whose oneDNN kernels read the plain weight faster; see linear_int8_packing_pays in
    gemm_int8.h)."""
    return _packing_pays(_C.kernel_isa())


@functools.lru_cache(maxsize=None)
def _packed_layout(isa: str, K: int, N: int) -> str:
    return _C.linear_int8_packed_layout(K, N)


def packed_layout(K: int, N: int) -> str:
    """pack_int8_weight's layout for a [N, K] weight under the active ISA: "vnni_panels",
    "onednn", "avx2_panels" or "none" (linear_int8_packed_layout in gemm_int8.h)."""
    return _packed_layout(_C.kernel_isa(), K, N)


def packs_own_panels(K: int, N: int) -> bool:
    """Whether pack_int8_weight writes our panels (VNNI or AVX2) for a [N, K] weight under the
    active ISA: linear_int8 then runs them at every row count."""
    return packed_layout(K, N) in ("vnni_panels", "avx2_panels")


def pack_int8_weight(qweight: torch.Tensor) -> Optional[torch.Tensor]:
    """qweight [N, K] int8 packed for linear_int8(packed=...) under the active ISA (uint8
    bytes): our VNNI panels on AVX-512 VNNI CPUs without AMX, oneDNN's blocked layout where its
    kernel is exact, else on AVX2 our AVX2 panels; None where there is no such layout. Derived
    data: never saved; pack again after set_isa."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.device.type != "cpu":
        raise TypeError(f"qweight: expected a 2-D int8 CPU tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n = _C.linear_int8_packed_bytes(qweight.shape[1], qweight.shape[0])
    if n <= 0:
        return None
    packed = torch.empty(n, dtype=torch.uint8)
    _C.linear_int8_pack(_views.view(qweight.contiguous(), "qweight"), _views.view(packed, "packed"))
    return packed


def linear_int8(qx: torch.Tensor, act_scales: torch.Tensor, act_zero_point: int, qweight: torch.Tensor,
                w_scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                backend: str = "auto", packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 [M, N] = ((qx - zp) @ qweight.T) * act_scales[m or 0] * w_scales[n] + bias[n].
    packed: pack_int8_weight(qweight), used with uint8 activations."""
    _check_backend(backend)
    if qx.dtype not in (torch.uint8, torch.int8) or qx.dim() != 2:
        raise TypeError(f"qx: expected a 2-D uint8/int8 tensor, got {qx.dtype} {tuple(qx.shape)}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != qx.shape[1]:
        raise ValueError(f"qweight: expected int8 [N, {qx.shape[1]}], got {qweight.dtype} {tuple(qweight.shape)}")
    if backend == "reference":
        return linear_int8_reference(qx, act_scales, act_zero_point, qweight, w_scales, bias)
    return _eager.call(_linear_int8, _linear_int8_impl, qx.contiguous(), act_scales,
                       int(act_zero_point), qweight, w_scales, bias, INT8_BACKENDS[backend], packed)


def linear_int8_reference(qx, act_scales, act_zero_point, qweight, w_scales, bias=None):
    acc = (qx.to(torch.int64) - act_zero_point) @ qweight.to(torch.int64).T  # exact
    a_s = act_scales[:, None] if act_scales.numel() == qx.shape[0] else act_scales.reshape(1, 1)
    out = acc.to(torch.float32) * (a_s * w_scales[None, :])
    return out + bias if bias is not None else out


def w8a8_call_args(inv_smooth: Optional[torch.Tensor], qweight: torch.Tensor, w_scales: torch.Tensor,
                   bias: Optional[torch.Tensor], backend: str, packed: Optional[torch.Tensor],
                   act_scale: Optional[float], act_zero_point: int, act_dtype: torch.dtype) -> tuple:
    """The eager native W8A8 call's checked arguments: (those between x and out, those after
    out) of _C.linear_w8a8(x, *before, out, *after). act_scale None: per-token codes. Callers
    with fixed tensors (Int8Linear) keep them across calls."""
    _check_backend(backend)
    _check_inv_smooth(inv_smooth, qweight.shape[1])
    if act_scale is not None:
        act_scale = _check_static(act_scale, act_zero_point, act_dtype)
    return ((_views.optional_view(inv_smooth, "inv_smooth"), _views.view(qweight, "qweight"),
             _views.view(w_scales, "w_scales"), _views.optional_view(bias, "bias")),
            (INT8_BACKENDS[backend], _views.optional_view(packed, "packed"), act_scale, int(act_zero_point),
             act_dtype == torch.uint8))


def _w8a8_native(x2, qweight, w_scales, bias, inv_smooth, act_scale: Optional[float], act_zero_point: int,
                 act_dtype: torch.dtype, backend: str, packed) -> torch.Tensor:
    """The native W8A8 call on fp32 x2 [M, K]: quantize and GEMM in one crossing."""
    _check_x(x2, inv_smooth)
    before_x, after_out = w8a8_call_args(inv_smooth, qweight, w_scales, bias, backend, packed, act_scale,
                                         act_zero_point, act_dtype)
    y = torch.empty(x2.shape[0], qweight.shape[0], dtype=torch.float32)
    _C.linear_w8a8(_views.view(x2.contiguous(), "x"), *before_x, _views.view(y, "out"), *after_out)
    return y


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                bias: Optional[torch.Tensor], inv_smooth: Optional[torch.Tensor] = None,
                act_scale: Optional[float] = None, act_zero_point: int = 0,
                act_dtype: torch.dtype = torch.uint8, backend: str = "auto",
                packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W.T + b for x [..., K] with int8 W: quantize x (static with act_scale, else per
    token), run the INT8 GEMM, return x's dtype. Per-token codes go to the GEMM as uint8 with
    zero point 128 (the same values), so both modes use the packed uint8 weight layout."""
    K = qweight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dimension {K}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a float tensor, got {x.dtype}")
    x2 = x.reshape(-1, K).to(torch.float32)
    if backend != "reference" and _eager.direct_ok((x2, inv_smooth, qweight, w_scales, bias, packed)):
        # Eager CPU call: both kernels in one crossing (the same functions, same bits).
        y = _w8a8_native(x2, qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point, act_dtype, backend,
                         packed)
        return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)
    if act_scale is None:
        qx, scales = quantize_per_token(x2, inv_smooth, backend, unsigned=True)
        zp = 128
    else:
        qx = quantize_static(x2, act_scale, act_zero_point, inv_smooth, act_dtype, backend)
        scales, zp = torch.tensor([act_scale], dtype=torch.float32), act_zero_point
    y = linear_int8(qx, scales, zp, qweight, w_scales, bias, backend, packed)
    return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


# ---------------------------------------------------------------- static W8A8, traced


def _linear_w8a8_static_impl(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                             bias: Optional[torch.Tensor], inv_smooth: Optional[torch.Tensor],
                             act_scale: torch.Tensor, act_zero_point: torch.Tensor, signed: bool, backend: str,
                             packed: Optional[torch.Tensor]) -> torch.Tensor:
    scale, zp = float(act_scale), int(act_zero_point)
    dtype = torch.int8 if signed else torch.uint8
    if backend == "reference":  # linear_w8a8's path, which would be the same float reads
        return linear_w8a8(x, qweight, w_scales, bias, inv_smooth, scale, zp, dtype, backend, packed)
    return _w8a8_native(x, qweight, w_scales, bias, inv_smooth, scale, zp, dtype, backend, packed)


_linear_w8a8_static = torch.library.custom_op("tensorslim::linear_w8a8_static", mutates_args=(),
                                              device_types="cpu")(_linear_w8a8_static_impl)


@_linear_w8a8_static.register_fake
def _linear_w8a8_static_fake(x, qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point, signed, backend,
                             packed):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


def linear_w8a8_static(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                       bias: Optional[torch.Tensor], inv_smooth: Optional[torch.Tensor], act_scale: torch.Tensor,
                       act_zero_point: torch.Tensor, signed: bool = False, backend: str = "auto",
                       packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Static W8A8 (x [M, K] fp32, contiguous) with the calibrated scale and zero point as
    0-dim tensors, read when the op runs: a traced graph (torch.export, torch.compile with
    fullgraph=True, fake / meta tensors) then holds no data-dependent host read of them. Same
    kernels and bits as linear_w8a8 with float arguments."""
    _check_backend(backend)
    return _linear_w8a8_static(x, qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point, bool(signed),
                               backend, packed)

