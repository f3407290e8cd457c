"""Integer quantize / dequantize and the weight-only (dequant-fused) linear.

int8/uint8/int4/uint4 run the kernels here; the other N-bit integer rows (int2..int7)
are passed on to the low-bit kernels (ops/lowbit.py), same layouts.

Conventions: a tensor is quantized row by row along its last dimension in groups of
`group_size` values; group_size == PER_TENSOR (-1) uses one scale for the whole
tensor, group_size >= the row length one per row (per channel / per token). A row has
ceil(cols / group_size) groups; when group_size does not divide cols the last one is short
(its scale comes from its own values). The CUDA kernels take whole groups only: a layer with
a short last group runs the plain-PyTorch reference on the GPU.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _views
from . import _eager, decode_gemm
from .._native import _C
from ..formats import INTEGER_KERNEL_FORMATS, PER_TENSOR, FormatSpec, get_format, has_short_group, num_groups
from . import lowbit

BACKENDS = {"auto": 0, "reference": 1, "native": 2, "onednn": 3}


def _groups(spec: FormatSpec, rows: int, cols: int, group_size: int) -> Tuple[int, int]:
    """(scale rows, scale cols) for a [rows, cols] tensor; validates the group size."""
    if group_size == PER_TENSOR:
        return 1, 1
    if group_size == cols:
        return rows, 1
    if group_size <= 0:
        raise ValueError(
            f"group_size must be {PER_TENSOR} (per tensor) or a positive number of values per group, "
            f"got {group_size} (row length {cols})"
        )
    groups = num_groups(cols, group_size)
    if spec.bits == 4 and groups > 1 and group_size % 2:
        raise ValueError(f"group_size must be even for the packed format {spec.name}")
    return rows, groups


def _check_float(x: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{what}: expected float32, bfloat16 or float16, got {x.dtype}")


def _integer_format(fmt: str) -> FormatSpec:
    spec = get_format(fmt)
    if not spec.is_integer:
        raise ValueError(f"format {fmt!r} is not an integer format; use ops.quantize_lowbit / "
                         f"dequantize_lowbit / linear_lowbit for it")
    return spec


def _lowbit_backend(backend: str) -> str:
    # N-bit rows other than INTEGER_KERNEL_FORMATS run the low-bit kernels, which have no
    # separate oneDNN path: "onednn" means the fastest one there.
    return "auto" if backend == "onednn" else backend


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(BACKENDS)}")


# ---------------------------------------------------------------- quantize


def _native_quantize(native_fn, x: torch.Tensor, fmt: str, group_size: int):
    """Outputs allocated here, filled by a native kernel (_C.quantize or _C.cuda_quantize)."""
    spec = get_format(fmt)
    q, scales, zps = _quantize_outputs(x, spec, group_size)
    native_fn(_views.view(x, "x"), spec.id, group_size, _views.view(q, "q"), _views.view(scales, "scales"),
              _views.view(zps, "zero_points") if spec.has_zero_point else None)
    return q, scales, zps


@torch.library.custom_op("tensorslim::quantize", mutates_args=(), device_types="cpu")
def _quantize(x: torch.Tensor, fmt: str, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _native_quantize(_C.quantize, x, fmt, group_size)


@_quantize.register_kernel("cuda")
def _quantize_cuda(x, fmt, group_size):
    if has_short_group(x.shape[1], group_size):  # the CUDA kernel takes whole groups only
        return quantize_reference(x, get_format(fmt), group_size)
    return _native_quantize(_C.cuda_quantize, x, fmt, group_size)


@_quantize.register_fake
def _quantize_fake(x, fmt, group_size):
    return _quantize_outputs(x, get_format(fmt), group_size)


def _quantize_outputs(x: torch.Tensor, spec: FormatSpec, group_size: int):
    rows, cols = x.shape
    srows, scols = _groups(spec, rows, cols, group_size)
    q = torch.empty(rows, spec.packed_cols(cols), dtype=spec.code_dtype, device=x.device)
    scales = torch.empty(srows, scols, dtype=torch.float32, device=x.device)
    zps = torch.empty((srows, scols) if spec.has_zero_point else (0,), dtype=torch.uint8, device=x.device)
    return q, scales, zps


def quantize(x: torch.Tensor, fmt: str, group_size: int = PER_TENSOR, backend: str = "auto"):
    """Quantize a 2-D float tensor row by row. Returns (q, scales, zero_points or None).

    q is [rows, packed cols] (INT4: two codes per byte, low nibble first), scales fp32
    [rows, ceil(cols / group_size)] ([1, 1] per tensor; the last group may be short), zero points uint8 of the same shape
    for the asymmetric formats.
    """
    spec = _integer_format(fmt)
    _check_float(x, "x")
    _check_backend(backend)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if fmt not in INTEGER_KERNEL_FORMATS:
        q, scales, zps, _ = lowbit.quantize_lowbit(x, fmt, group_size, _lowbit_backend(backend))
        return q, scales, zps
    _groups(spec, x.shape[0], x.shape[1], group_size)
    if backend == "reference":
        q, scales, zps = quantize_reference(x, spec, group_size)
    else:
        q, scales, zps = _quantize(x, fmt, group_size)
    return q, scales, (zps if spec.has_zero_point else None)


def check_finite_rows(x: torch.Tensor) -> None:
    """The quantizers' error for a NaN / Inf in x [rows, cols], naming the first such row."""
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"quantize: x contains NaN or Inf (row {row}); quantization needs finite values")


def quantize_reference(x: torch.Tensor, spec: FormatSpec, group_size: int):
    """The specification in plain PyTorch (IEEE fp32, round half to even)."""
    rows, cols = x.shape
    xf = x.float()
    check_finite_rows(xf)
    srows, scols = _groups(spec, rows, cols, group_size)
    if group_size == PER_TENSOR:
        grouped = xf.reshape(1, 1, -1)
    else:
        gsize = min(group_size, cols) if scols else 0
        # A short last group is padded with zeros: every group's range includes 0 anyway.
        padded = F.pad(xf, (0, scols * gsize - cols)) if scols else xf
        grouped = padded.reshape(rows, scols, gsize)
    zero = torch.zeros((), device=x.device)
    if grouped.numel():
        lo = torch.minimum(grouped.amin(-1), zero)
        hi = torch.maximum(grouped.amax(-1), zero)
    else:
        lo = hi = torch.zeros(srows, scols, device=x.device)
    lo, hi = lo.reshape(srows, scols), hi.reshape(srows, scols)
    if spec.has_zero_point:
        scales = lowbit.asymmetric_scale(lo, hi, spec.scale_divisor)
    else:
        scales = torch.maximum(-lo, hi) / spec.scale_divisor
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    if spec.has_zero_point:
        zp = torch.round(-lo / scales).clamp(spec.qmin, spec.qmax)
    else:
        zp = torch.zeros_like(scales)
    expand = (lambda t: t.expand(rows, cols)) if group_size == PER_TENSOR else (
        lambda t: _per_value(t, group_size, cols))
    codes = (torch.round(xf / expand(scales)) + expand(zp)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    if spec.bits == 4:
        q = pack_int4(codes)
    else:
        q = codes.to(spec.code_dtype)
    zps = zp.to(torch.uint8) if spec.has_zero_point else torch.empty(0, dtype=torch.uint8, device=x.device)
    return q, scales, zps


def _per_value(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """[rows, groups] per-group values -> [rows, cols], the last group possibly short."""
    if not t.shape[1]:
        return t[:, :0]
    return t.repeat_interleave(min(group_size, cols), dim=1)[:, :cols]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] int codes -> [rows, ceil(cols/2)] bytes, low nibble first."""
    rows, cols = codes.shape
    if cols % 2:
        codes = F.pad(codes, (0, 1))
    nib = (codes & 0xF).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_int4(q: torch.Tensor, cols: int, signed: bool) -> torch.Tensor:
    """Inverse of pack_int4: [rows, bytes] -> [rows, cols] int32 codes."""
    lo = (q & 0xF).to(torch.int32)
    hi = (q >> 4).to(torch.int32)
    codes = torch.stack([lo, hi], dim=-1).reshape(q.shape[0], -1)[:, :cols]
    return (codes ^ 8) - 8 if signed else codes


# ---------------------------------------------------------------- dequantize


def _native_dequantize(native_fn, q, scales, zero_points, fmt, group_size, cols, dtype):
    spec = get_format(fmt)
    out = torch.empty(q.shape[0], cols, dtype=dtype, device=q.device)
    native_fn(_views.view(q, "q"), _views.view(scales, "scales"),
              _views.view(zero_points, "zero_points") if spec.has_zero_point else None,
              spec.id, group_size, _views.view(out, "out"))
    return out


def _dequantize_impl(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, fmt: str,
                     group_size: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return _native_dequantize(_C.dequantize, q, scales, zero_points, fmt, group_size, cols, dtype)


_dequantize = torch.library.custom_op("tensorslim::dequantize", mutates_args=(),
                                      device_types="cpu")(_dequantize_impl)


@_dequantize.register_kernel("cuda")
def _dequantize_cuda(q, scales, zero_points, fmt, group_size, cols, dtype):
    if has_short_group(cols, group_size):  # the CUDA kernel takes whole groups only
        return dequantize_reference(q, scales, zero_points, get_format(fmt), group_size, cols).to(dtype)
    return _native_dequantize(_C.cuda_dequantize, q, scales, zero_points, fmt, group_size, cols, dtype)


@_dequantize.register_fake
def _dequantize_fake(q, scales, zero_points, fmt, group_size, cols, dtype):
    return torch.empty(q.shape[0], cols, dtype=dtype, device=q.device)


def dequantize(q, scales, zero_points, fmt: str, group_size: int, cols: int,
               dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """(q - zero_point) * scale, back to a [rows, cols] float tensor."""
    spec = _integer_format(fmt)
    _check_backend(backend)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dequantize: dtype must be a float type, got {dtype}")
    lowbit.check_cols(spec, q, cols, "dequantize")
    if spec.has_zero_point and zero_points is None:
        raise ValueError(f"format {fmt} needs zero_points")
    if fmt not in INTEGER_KERNEL_FORMATS:
        return lowbit.dequantize_lowbit(q, scales, zero_points, None, fmt, group_size, cols, dtype,
                                        _lowbit_backend(backend))
    if backend == "reference":
        return dequantize_reference(q, scales, zero_points, spec, group_size, cols).to(dtype)
    zps = zero_points if spec.has_zero_point else torch.empty(0, dtype=torch.uint8, device=q.device)
    return _dequantize(q, scales, zps, fmt, group_size, cols, dtype)


def dequantize_reference(q, scales, zero_points, spec: FormatSpec, group_size: int, cols: int):
    rows = q.shape[0]
    if spec.bits == 4:
        codes = unpack_int4(q, cols, signed=not spec.has_zero_point)
    else:
        codes = q.to(torch.int32)
    zp = zero_points.to(torch.int32) if spec.has_zero_point else torch.zeros_like(scales, dtype=torch.int32)
    if group_size == PER_TENSOR:
        s, z = scales.expand(rows, cols), zp.expand(rows, cols)
    else:
        s, z = _per_value(scales, group_size, cols), _per_value(zp, group_size, cols)
    return (codes - z).float() * s


# ---------------------------------------------------------------- weight-only linear


def _linear_weight_only_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
                        group_size: int, backend: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    _C.linear_weight_only(_views.view(x, "x"), _views.view(qweight, "qweight"), _views.view(scales, "scales"),
                          _views.optional_view(zero_points, "zero_points"), _views.optional_view(bias, "bias"),
                          get_format(fmt).id, group_size, _views.view(out, "out"), backend)
    return out


_linear_weight_only = torch.library.custom_op("tensorslim::linear_weight_only", mutates_args=(),
                                   device_types="cpu")(_linear_weight_only_impl)


@_linear_weight_only.register_kernel("cuda")
def _linear_weight_only_cuda(x, qweight, scales, zero_points, bias, fmt, group_size, backend):
    M, K = x.shape
    if has_short_group(K, group_size):  # the CUDA kernels take whole groups only
        w = dequantize_reference(qweight, scales, zero_points, get_format(fmt), group_size, K)
        return F.linear(x.float(), w, bias).to(x.dtype)
    N = qweight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # Above the fused GEMV's batch limit the weight is dequantized here (in x's dtype) for cuBLAS.
    workspace = torch.empty(N, K, dtype=x.dtype, device=x.device) if M > 8 else None
    _C.cuda_linear_weight_only(_views.view(x, "x"), _views.view(qweight, "qweight"), _views.view(scales, "scales"),
                               _views.optional_view(zero_points, "zero_points"), _views.optional_view(bias, "bias"),
                               get_format(fmt).id, group_size, _views.view(out, "out"),
                               _views.optional_view(workspace, "workspace"))
    return out


@_linear_weight_only.register_fake
def _linear_weight_only_fake(x, qweight, scales, zero_points, bias, fmt, group_size, backend):
    return x.new_empty(x.shape[0], qweight.shape[0])


def linear_weight_only_direct(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                              zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
                              group_size: int, in_features: int, backend: str) -> Optional[torch.Tensor]:
    """linear_weight_only for a layer's own packed tensors (checked when the layer was built)
    and an input whose last dimension the layer has checked, in the common case: fp32 CPU
    input, eager, nothing for the dispatcher to do. The same CPU function with the same
    arguments, so the same bits, without re-checking every argument per call (~20 us of a
    ~55 us batch-1 call at MiniLM's widths). None where the case does not hold: the caller
    then calls linear_weight_only. N-bit rows outside INTEGER_KERNEL_FORMATS (int2, int3, ...)
    take lowbit's direct call with the arguments linear_weight_only passes lowbit (an int3
    384 x 1536 layer at 1 row paid ~60 us of argument checks on top of its kernel)."""
    if fmt not in INTEGER_KERNEL_FORMATS:
        return lowbit.linear_lowbit_direct(x, qweight, scales, zero_points, None, bias, fmt, group_size,
                                           in_features, _lowbit_backend(backend))
    if (x.dtype != torch.float32 or backend == "reference"
            or not _eager.direct_ok((x, qweight, scales, zero_points, bias))):
        return None
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1 or decode_gemm.applies(x2, backend, qweight.shape[0] * in_features):
        return None
    zps = zero_points if get_format(fmt).has_zero_point else None
    y = _linear_weight_only_impl(x2, qweight, scales, zps, bias, fmt, group_size, BACKENDS[backend])
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def linear_weight_only(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
                       group_size: int, in_features: int, backend: str = "auto") -> torch.Tensor:
    """y = x @ dequantize(qweight).T + bias for x of shape [..., in_features]."""
    spec = _integer_format(fmt)
    _check_backend(backend)
    _check_float(x, "x")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features}, got shape {tuple(x.shape)}")
    if spec.has_zero_point and zero_points is None:
        raise ValueError(f"format {fmt} needs zero_points")
    if fmt not in INTEGER_KERNEL_FORMATS:
        return lowbit.linear_lowbit(x, qweight, scales, zero_points, None, bias, fmt, group_size,
                                    in_features, _lowbit_backend(backend))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if backend == "reference":
        w = dequantize_reference(qweight, scales, zero_points, spec, group_size, in_features)
        y = F.linear(x2.float(), w, bias).to(x.dtype)
    else:
        # The CPU kernels take fp32 / bf16 activations; fp16 runs in fp32 and is cast back.
        cpu_fp16 = x2.dtype == torch.float16 and x2.device.type == "cpu"
        if cpu_fp16:
            x2 = x2.float()
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        zps = zero_points if spec.has_zero_point else None
        if decode_gemm.applies(x2, backend, qweight.shape[0] * in_features) and in_features:
            empty = torch.empty(0, dtype=torch.uint8)
            y = decode_gemm.linear(x2, lambda: _eager.call(
                _dequantize, _dequantize_impl, qweight, scales, empty if zps is None else zps, fmt,
                group_size, in_features, torch.float32), bias)
        else:
            y = _eager.call(_linear_weight_only, _linear_weight_only_impl, x2, qweight, scales, zps,
                            bias, fmt, group_size, BACKENDS[backend])
        if cpu_fp16:
            y = y.to(torch.float16)
    return y.reshape(*lead, qweight.shape[0])
