"""Quantize / dequantize / weight-only linear for every row of the format table.

Covers N-bit integers (int2..int8, uint2..uint8), FP8 (fp8_e4m3, fp8_e5m2), NVFP4,
MXFP4, binary and ternary; docs/formats.md states the encodings. Codes are packed per
row as a little-endian bit stream (value i at bit i*bits). Scales are fp32, except the
one-byte E4M3 (NVFP4) and E8M0 (MXFP4) block scales; NVFP4 adds one fp32 tensor scale.

Each native op has a fake implementation and a plain-PyTorch reference
(backend="reference") that follows the same specification bit for bit.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _views
from . import _eager, decode_gemm
from .._native import _C
from ..formats import PER_TENSOR, FormatSpec, get_format

# "reference" is the plain-PyTorch specification below; the others are native paths:
# "scalar" is the C++ reference, "native" the AVX-512 / AVX2 kernels, "auto" the fastest that fits.
LOWBIT_BACKENDS = {"auto": 0, "scalar": 1, "native": 2}
GEMV_MAX_ROWS = 8  # above this the panel GEMM decodes the weight once per call (the scalar path:
# decode + sgemm); kLowbitGemvMaxRows, _C.lowbit_gemv_max_rows()
SGEMM_TILE_ROWS = 256  # weight rows decoded per sgemm call (4 MiB of fp32 at K = 4096)


def _check_backend(backend: str) -> None:
    if backend != "reference" and backend not in LOWBIT_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of "
                         f"{sorted(LOWBIT_BACKENDS) + ['reference']}")


def _check_float(x: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{what}: expected float32, bfloat16 or float16, got {x.dtype}")


def default_group_size(spec: FormatSpec) -> int:
    """The block size for NVFP4 / MXFP4, one scale per tensor otherwise."""
    return spec.block_size or PER_TENSOR


def scale_shape(spec: FormatSpec, rows: int, cols: int, group_size: int) -> Tuple[int, int]:
    """(scale rows, scale cols) for a [rows, cols] tensor; validates the group size. A row has
    ceil(cols / group_size) groups: the last one holds what is left when the group does not
    divide the row (all of a row shorter than one group); docs/formats.md."""
    if spec.block_size and group_size != spec.block_size:
        raise ValueError(f"format {spec.name} uses blocks of {spec.block_size}: group_size must be "
                         f"{spec.block_size}, got {group_size}")
    if group_size == PER_TENSOR:
        return 1, 1
    if group_size == cols:
        return rows, 1
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size {group_size} must be {PER_TENSOR} (per tensor), the row length "
                         f"{cols} (per row) or a positive group size")
    groups = -(-cols // group_size)
    if groups > 1 and (group_size * spec.bits) % 8:
        raise ValueError(f"format {spec.name}: group_size * {spec.bits} bits must be a whole number "
                         f"of bytes, got group_size {group_size}")
    return rows, groups


def group_width(group_size: int, cols: int, groups: int) -> int:
    """Values per full group (the reference pads the short last group up to it)."""
    if groups == 0:
        return 0
    return cols if group_size in (PER_TENSOR, cols) else group_size


def short_last_group(group_size: int, cols: int) -> bool:
    """Whether a row's last group holds fewer than group_size values. The CUDA kernels are
    not tested on such rows: tensors on a GPU then take the plain-PyTorch reference."""
    return group_size not in (PER_TENSOR, cols) and group_size > 0 and cols % group_size != 0


def _grouped(x: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """[rows, cols] -> [rows, groups, width], the short last group zero-padded."""
    rows, cols = x.shape
    return F.pad(x, (0, groups * width - cols)).reshape(rows, groups, width)


def _group_counts(cols: int, groups: int, width: int, device) -> torch.Tensor:
    """[1, groups, 1] values per group: width, the last one what is left of the row."""
    n = torch.full((1, groups, 1), width, dtype=torch.float64, device=device)
    if groups:
        n[0, -1, 0] = cols - (groups - 1) * width
    return n


# ---------------------------------------------------------------- reference encoders


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as float32 for integer k (any range fp32 holds, subnormals included)."""
    return torch.pow(torch.tensor(2.0, dtype=torch.float64), k.to(torch.float64)).float()


def float_encode(x: torch.Tensor, man_bits: int, bias: int, max_code: int, max_value: float,
                 sign_bit: int) -> torch.Tensor:
    """Round-to-nearest-even, saturating encoding of finite float32 values into a small
    float (sign_bit = the sign's bit position); NaN / Inf are the caller's business."""
    x = x.float()
    a = x.abs()
    E = (torch.frexp(a).exponent - 1).clamp(min=1 - bias)  # floor(log2 a), or the subnormal exponent
    q = torch.round(a * _pow2(man_bits - E))  # exact scaling; round() is half to even
    code = ((E + bias - 1) << man_bits) + q.to(torch.int32)
    code = torch.where(a < max_value, code.clamp(max=max_code), torch.full_like(code, max_code))
    code = torch.where(a == 0, torch.zeros_like(code), code)
    return code | (torch.signbit(x).to(torch.int32) << sign_bit)


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    code = float_encode(torch.nan_to_num(x, nan=0.0), 3, 7, 0x7E, 448.0, 7)
    return torch.where(torch.isnan(x), code | 0x7F, code)


def e5m2_encode(x: torch.Tensor) -> torch.Tensor:
    code = float_encode(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=-0.0), 2, 15, 0x7B, 57344.0, 7)
    code = torch.where(torch.isinf(x), (code & 0x80) | 0x7C, code)
    return torch.where(torch.isnan(x), code | 0x7E, code)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    code = float_encode(torch.nan_to_num(x, nan=0.0), 1, 1, 0x7, 6.0, 3)
    return torch.where(torch.isnan(x), torch.zeros_like(code), code)


def decode_table(spec: FormatSpec, device=None) -> torch.Tensor:
    return torch.tensor(spec.code_values, dtype=torch.float32, device=device)


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    return decode_table(get_format("fp8_e4m3"), codes.device)[codes.long()]


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    v = _pow2(codes.to(torch.int32) - 127)
    return torch.where(codes == 255, torch.full_like(v, float("nan")), v)


# ---------------------------------------------------------------- bit packing


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] int codes -> [rows, ceil(cols*bits/8)] uint8, value i at bit i*bits."""
    rows, cols = codes.shape
    units = (cols + 7) // 8  # eight values fill exactly `bits` bytes
    c = F.pad(codes.to(torch.int64) & ((1 << bits) - 1), (0, units * 8 - cols)).reshape(rows, units, 8)
    word = (c << (torch.arange(8, device=codes.device) * bits)).sum(-1)
    out = (word.unsqueeze(-1) >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    return out.reshape(rows, units * bits)[:, : (cols * bits + 7) // 8].to(torch.uint8)


def unpack_bits(q: torch.Tensor, cols: int, bits: int, signed: bool) -> torch.Tensor:
    """Inverse of pack_bits: [rows, bytes] -> [rows, cols] int32 codes."""
    rows = q.shape[0]
    units = (cols + 7) // 8
    b = F.pad(q.view(torch.uint8).to(torch.int64), (0, units * bits - q.shape[1])).reshape(rows, units, bits)
    word = (b << (torch.arange(bits, device=q.device) * 8)).sum(-1)
    c = (word.unsqueeze(-1) >> (torch.arange(8, device=q.device) * bits)) & ((1 << bits) - 1)
    c = c.reshape(rows, units * 8)[:, :cols].to(torch.int32)
    return ((c ^ (1 << (bits - 1))) - (1 << (bits - 1))) if signed else c


# ---------------------------------------------------------------- reference quantize


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in index order, in float64 (the order the C++ kernel uses)."""
    t = t.double()
    return t.cumsum(-1)[..., -1] if t.shape[-1] else t.sum(-1)


def quantize_lowbit_reference(x: torch.Tensor, spec: FormatSpec, group_size: int):
    """The specification in plain PyTorch: (q, scales, zero_points, tensor_scale), the last
    two empty when the format has none."""
    rows, cols = x.shape
    xf = x.float()
    bad = ~torch.isfinite(xf)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"quantize ({spec.name}): x contains NaN or Inf (row {row}); "
                         "quantization needs finite values")
    srows, scols = scale_shape(spec, rows, cols, group_size)
    per_tensor = group_size == PER_TENSOR
    gsize = group_width(group_size, cols, scols)
    # per tensor: [rows, 1, cols], reduced over rows too. A short last group is zero-padded:
    # zeros change no max / min (both include 0) or sum, and only the counts below see them.
    g = _grouped(xf, scols, gsize)
    absg = g.abs()
    dev = x.device
    red_dims = (0, 1, 2) if per_tensor else (2,)

    def reduce(t, op):  # per group (or tensor), keepdim; empty groups give 0, as in C++
        if t.numel() == 0:
            return torch.zeros((1, 1, 1) if per_tensor else (rows, scols, 1), device=dev)
        return getattr(t, op)(dim=red_dims, keepdim=True)

    amax = reduce(absg, "amax")
    ts = torch.empty(0, device=dev)
    zp = torch.zeros(1, 1, 1, device=dev)
    scale_bytes = None

    def seq_mean(t):  # per group, or per tensor as the sum of per-row sums (C++ order)
        s = _seq_sum(t)
        if per_tensor:
            return _seq_sum(s.reshape(1, 1, -1)).reshape(1, 1, 1), t.shape[-1] * t.shape[0]
        return s.unsqueeze(-1), _group_counts(cols, scols, gsize, dev)

    def divide(s, n):  # s / n per group, 0 where a group is empty
        if isinstance(n, int):
            return (s / n).float() if n else torch.zeros_like(s).float()
        return torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s)).float()

    if spec.is_integer:
        lo = torch.minimum(reduce(g, "amin"), torch.zeros(()))
        hi = torch.maximum(reduce(g, "amax"), torch.zeros(()))
        if spec.has_zero_point:
            scale = asymmetric_scale(lo, hi, spec.scale_divisor)
        else:
            scale = torch.maximum(-lo, hi) / spec.scale_divisor
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if spec.has_zero_point:
            zp = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
        codes = (torch.round(g / scale) + zp).clamp(spec.qmin, spec.qmax).to(torch.int32)
    elif spec.name in ("fp8_e4m3", "fp8_e5m2"):
        scale = amax / spec.max_value
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        enc = e4m3_encode if spec.name == "fp8_e4m3" else e5m2_encode
        codes = enc(g / scale)
    elif spec.name == "nvfp4":
        t = amax.max() / (6.0 * 448.0) if amax.numel() else torch.zeros(())
        t = torch.where(t > 0, t, torch.ones_like(t)).float()
        ts = t.reshape(1)
        scale_bytes = e4m3_encode(amax / 6.0 / t)
        scale = e4m3_decode(scale_bytes) * t
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.where(scale > 0, e2m1_encode(g / safe), torch.zeros_like(g, dtype=torch.int32))
    elif spec.name == "mxfp4":
        e = torch.where(amax > 0, torch.frexp(amax).exponent - 3, torch.full_like(amax, -127, dtype=torch.int32))
        scale_bytes = (e.clamp(-127, 127) + 127)
        scale = e8m0_decode(scale_bytes)
        codes = e2m1_encode(g / scale)
    elif spec.name == "binary":
        s, n = seq_mean(absg)
        scale = divide(s, n)
        codes = (g >= 0).to(torch.int32)  # -0.0 >= 0 too: zero maps to +1
    elif spec.name == "ternary":
        s, n = seq_mean(absg)
        m = divide(s, n)
        thr = torch.tensor(0.7, dtype=torch.float32) * m
        above = absg > thr
        s2, _ = seq_mean(absg * above)
        count = above.sum(dim=red_dims, keepdim=True)
        scale = torch.where(count > 0, (s2 / count.clamp(min=1)).float(), torch.zeros_like(m))
        codes = torch.where(above, torch.sign(g), torch.zeros_like(g)).to(torch.int32)
    else:
        raise ValueError(f"format {spec.name} has no reference quantizer")

    q = pack_bits(codes.flatten(1)[:, :cols], spec.bits)
    if spec.code_dtype == torch.int8:
        q = q.view(torch.int8)
    if scale_bytes is not None:
        scales = scale_bytes.reshape(srows, scols).to(torch.uint8)
    else:
        scales = scale.float().expand(srows if not per_tensor else 1, scols, 1).reshape(srows, scols).clone()
    zps = (zp.expand(srows, scols, 1).reshape(srows, scols).to(torch.uint8) if spec.has_zero_point
           else torch.empty(0, dtype=torch.uint8, device=dev))
    return q, scales, zps, ts


def dequantize_lowbit_reference(q, scales, zero_points, tensor_scale, spec: FormatSpec,
                                group_size: int, cols: int) -> torch.Tensor:
    rows = q.shape[0]
    signed = spec.is_integer and not spec.has_zero_point
    codes = unpack_bits(q, cols, spec.bits, signed)
    if group_size == PER_TENSOR:
        expand = lambda t: t.reshape(1, 1).expand(rows, cols)  # noqa: E731
    else:  # each group's scale over its values; the last group may be short
        rep = group_width(group_size, cols, scales.shape[1])
        expand = lambda t: t.repeat_interleave(rep, dim=1)[:, :cols]  # noqa: E731
    if spec.scale_format == "e4m3":
        values = decode_table(spec, q.device)[codes.long()]
        return (values * expand(e4m3_decode(scales))) * tensor_scale.reshape(()).float()
    if spec.scale_format == "e8m0":
        return decode_table(spec, q.device)[codes.long()] * expand(e8m0_decode(scales))
    if spec.code_values:
        return decode_table(spec, q.device)[codes.long()] * expand(scales)
    zp = zero_points.to(torch.int32) if spec.has_zero_point else torch.zeros_like(scales, dtype=torch.int32)
    return (codes - expand(zp)).float() * expand(scales)


# ---------------------------------------------------------------- native ops


def _opt(t: torch.Tensor):
    return t if t.numel() else None



def asymmetric_scale(lo: torch.Tensor, hi: torch.Tensor, divisor: float) -> torch.Tensor:
    """(hi - lo) / divisor, except where finite values near +-3.4e38 overflow hi - lo: there
    the halves are divided first (the C++ core's asymmetric_scale, same results)."""
    span = hi - lo
    return torch.where(torch.isinf(span), hi / divisor - lo / divisor, span / divisor)

@torch.library.custom_op("tensorslim::quantize_lowbit", mutates_args=(), device_types="cpu")
def _quantize_lowbit(x: torch.Tensor, fmt: str, group_size: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = get_format(fmt)
    q, scales, zps, ts = _quantize_outputs(x, spec, group_size)
    _C.quantize_lowbit(_views.view(x, "x"), spec.id, group_size, _views.view(q, "q"),
                       _views.view(scales, "scales"),
                       _views.view(zps, "zero_points") if spec.has_zero_point else None,
                       _views.view(ts, "tensor_scale") if spec.has_tensor_scale else None)
    return q, scales, zps, ts


@_quantize_lowbit.register_kernel("cuda")
def _quantize_lowbit_cuda(x, fmt, group_size):
    # Quantization is offline work: the CPU kernels encode, the codes move to the GPU.
    return tuple(t.to(x.device) for t in _quantize_lowbit(x.cpu(), fmt, group_size))


@_quantize_lowbit.register_fake
def _quantize_lowbit_fake(x, fmt, group_size):
    return _quantize_outputs(x, get_format(fmt), group_size)


def _quantize_outputs(x: torch.Tensor, spec: FormatSpec, group_size: int):
    rows, cols = x.shape
    srows, scols = scale_shape(spec, rows, cols, group_size)
    q = torch.empty(rows, spec.packed_cols(cols), dtype=spec.code_dtype, device=x.device)
    scales = torch.empty(srows, scols, dtype=spec.scale_dtype, device=x.device)
    zps = torch.empty((srows, scols) if spec.has_zero_point else (0,), dtype=torch.uint8, device=x.device)
    ts = torch.empty(1 if spec.has_tensor_scale else 0, dtype=torch.float32, device=x.device)
    return q, scales, zps, ts


def quantize_lowbit(x: torch.Tensor, fmt: str, group_size: Optional[int] = None, backend: str = "auto"):
    """Quantize a 2-D float tensor row by row into any format of the table.

    Returns (q, scales, zero_points or None, tensor_scale or None). group_size None picks
    the format's block size (NVFP4 16, MXFP4 32) or one scale per tensor.
    """
    spec = get_format(fmt)
    _check_float(x, "x")
    _check_backend(backend)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if group_size is None:
        group_size = default_group_size(spec)
    scale_shape(spec, x.shape[0], x.shape[1], group_size)
    if backend == "reference":
        q, scales, zps, ts = quantize_lowbit_reference(x, spec, group_size)
    else:
        q, scales, zps, ts = _quantize_lowbit(x, fmt, group_size)
    return q, scales, (zps if spec.has_zero_point else None), (ts if spec.has_tensor_scale else None)


def _dequantize_lowbit_impl(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                            tensor_scale: torch.Tensor, fmt: str, group_size: int, cols: int,
                            dtype: torch.dtype) -> torch.Tensor:
    spec = get_format(fmt)
    out = torch.empty(q.shape[0], cols, dtype=dtype, device=q.device)
    _C.dequantize_lowbit(_views.view(q, "q"), _views.view(scales, "scales"),
                         _views.view(zero_points, "zero_points") if spec.has_zero_point else None,
                         _views.view(tensor_scale, "tensor_scale") if spec.has_tensor_scale else None,
                         spec.id, group_size, _views.view(out, "out"))
    return out


_dequantize_lowbit = torch.library.custom_op("tensorslim::dequantize_lowbit", mutates_args=(),
                                             device_types="cpu")(_dequantize_lowbit_impl)


@_dequantize_lowbit.register_kernel("cuda")
def _dequantize_lowbit_cuda(q, scales, zero_points, tensor_scale, fmt, group_size, cols, dtype):
    spec = get_format(fmt)
    out = torch.empty(q.shape[0], cols, dtype=torch.float32, device=q.device)
    _C.cuda_dequantize_lowbit(_views.view(q, "q"), _views.view(scales, "scales"),
                              _views.view(zero_points, "zero_points") if spec.has_zero_point else None,
                              _views.view(tensor_scale, "tensor_scale") if spec.has_tensor_scale else None,
                              spec.id, group_size, _views.view(out, "out"))
    return out.to(dtype)


@_dequantize_lowbit.register_fake
def _dequantize_lowbit_fake(q, scales, zero_points, tensor_scale, fmt, group_size, cols, dtype):
    return torch.empty(q.shape[0], cols, dtype=dtype, device=q.device)


def _needed(spec: FormatSpec, zero_points, tensor_scale, device):
    if spec.has_zero_point and zero_points is None:
        raise ValueError(f"format {spec.name} needs zero_points")
    if spec.has_tensor_scale and tensor_scale is None:
        raise ValueError(f"format {spec.name} needs tensor_scale")
    empty = torch.empty(0, dtype=torch.uint8, device=device)
    zps = zero_points if spec.has_zero_point else empty
    ts = tensor_scale if spec.has_tensor_scale else torch.empty(0, dtype=torch.float32, device=device)
    return zps, ts


def check_cols(spec: FormatSpec, q, cols, fn: str) -> None:
    """cols must be what q's packed rows hold (checked before [rows, cols] is allocated)."""
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 0:
        raise ValueError(f"{fn}: cols must be an int >= 0, got {cols!r}")
    if isinstance(q, torch.Tensor) and q.dim() == 2 and spec.packed_cols(cols) != q.shape[1]:
        raise ValueError(f"{fn}: {spec.name} rows of {cols} values pack into {spec.packed_cols(cols)} columns, "
                         f"q has {q.shape[1]}")


def dequantize_lowbit(q, scales, zero_points, tensor_scale, fmt: str, group_size: int, cols: int,
                      dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Decode back to a [rows, cols] float tensor."""
    spec = get_format(fmt)
    _check_backend(backend)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dequantize_lowbit: dtype must be a float type, got {dtype}")
    check_cols(spec, q, cols, "dequantize_lowbit")
    zps, ts = _needed(spec, zero_points, tensor_scale, q.device)
    if backend == "reference" or (q.device.type == "cuda" and short_last_group(group_size, cols)):
        return dequantize_lowbit_reference(q, scales, zps, ts, spec, group_size, cols).to(dtype)
    return _dequantize_lowbit(q, scales, zps, ts, fmt, group_size, cols, dtype)


# ---------------------------------------------------------------- weight-only linear


def _linear_lowbit_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zero_points: torch.Tensor, tensor_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   fmt: str, group_size: int, backend: int) -> torch.Tensor:
    spec = get_format(fmt)
    M, K = x.shape
    N = qweight.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    # Above the GEMV's batch the scalar path decodes the weight, a tile of rows at a time, into
    # this buffer for sgemm (decoded once per call, not once per activation row).
    rows = max(1, min(N, SGEMM_TILE_ROWS))
    workspace = (torch.empty(rows, K, dtype=torch.float32, device=x.device)
                 if M > _C.lowbit_gemv_max_rows() and _C.active_isa() == "scalar" else None)
    _C.linear_lowbit(_views.view(x, "x"), _views.view(qweight, "qweight"), _views.view(scales, "scales"),
                     _views.view(zero_points, "zero_points") if spec.has_zero_point else None,
                     _views.view(tensor_scale, "tensor_scale") if spec.has_tensor_scale else None,
                     _views.optional_view(bias, "bias"), spec.id, group_size, _views.view(out, "out"),
                     _views.optional_view(workspace, "workspace"), backend)
    return out


_linear_lowbit = torch.library.custom_op("tensorslim::linear_lowbit", mutates_args=(),
                                   device_types="cpu")(_linear_lowbit_impl)


@_linear_lowbit.register_kernel("cuda")
def _linear_lowbit_cuda(x, qweight, scales, zero_points, tensor_scale, bias, fmt, group_size, backend):
    spec = get_format(fmt)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=torch.float32, device=x.device)
    _C.cuda_linear_lowbit(_views.view(x, "x"), _views.view(qweight, "qweight"), _views.view(scales, "scales"),
                          _views.view(zero_points, "zero_points") if spec.has_zero_point else None,
                          _views.view(tensor_scale, "tensor_scale") if spec.has_tensor_scale else None,
                          _views.optional_view(bias, "bias"), spec.id, group_size, _views.view(out, "out"))
    return out


@_linear_lowbit.register_fake
def _linear_lowbit_fake(x, qweight, scales, zero_points, tensor_scale, bias, fmt, group_size, backend):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


def linear_lowbit_direct(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zero_points: Optional[torch.Tensor], tensor_scale: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], fmt: str, group_size: int, in_features: int,
                         backend: str) -> Optional[torch.Tensor]:
    """linear_lowbit for a layer's own packed tensors and a checked input in the common case
    (fp32 CPU input, eager, nothing for the dispatcher to do): the same CPU function with the
    same arguments, without re-checking them per call (see weight_only.linear_weight_only_direct).
    None where the case does not hold: the caller then calls linear_lowbit."""
    if (x.dtype != torch.float32 or backend == "reference"
            or (bias is not None and bias.dtype != torch.float32)
            or not _eager.direct_ok((x, qweight, scales, zero_points, tensor_scale, bias))):
        return None
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous() or decode_gemm.applies(x2, backend, qweight.shape[0] * in_features):
        return None
    zps, ts = _needed(get_format(fmt), zero_points, tensor_scale, x.device)
    y = _linear_lowbit_impl(x2, qweight, scales, zps, ts, bias, fmt, group_size, LOWBIT_BACKENDS[backend])
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def linear_lowbit(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zero_points: Optional[torch.Tensor], tensor_scale: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], fmt: str, group_size: int, in_features: int,
                  backend: str = "auto") -> torch.Tensor:
    """y = x @ dequantize_lowbit(qweight).T + bias for x of shape [..., in_features].

    The native kernels compute in fp32; bf16/fp16 inputs are converted and the result
    is returned in x's dtype.
    """
    spec = get_format(fmt)
    _check_backend(backend)
    _check_float(x, "x")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features}, got shape {tuple(x.shape)}")
    zps, ts = _needed(spec, zero_points, tensor_scale, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), in_features).float()
    b = None if bias is None else bias.float()
    if backend == "reference" or (x.device.type == "cuda" and short_last_group(group_size, in_features)):
        w = dequantize_lowbit_reference(qweight, scales, zps, ts, spec, group_size, in_features)
        y = F.linear(x2, w, b)
    elif decode_gemm.applies(x2, backend, qweight.shape[0] * in_features) and in_features:
        y = decode_gemm.linear(x2, lambda: _eager.call(
            _dequantize_lowbit, _dequantize_lowbit_impl, qweight, scales, zps, ts, fmt, group_size,
            in_features, torch.float32), b)
    else:
        y = _eager.call(_linear_lowbit, _linear_lowbit_impl, x2.contiguous(), qweight, scales, zps,
                        ts, b, fmt, group_size, LOWBIT_BACKENDS[backend])
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


def pack_codes(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Integer codes [rows, cols] in the format's range (int<N>: qmin..qmax, uint<N>:
    0..qmax) -> the packed bytes quantize_lowbit stores (value i at bit i*bits)."""
    spec = get_format(fmt)
    if not spec.is_integer:
        raise ValueError(f"pack_codes: {fmt} is not an integer format")
    if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
        raise ValueError(f"pack_codes: codes must lie in [{spec.qmin}, {spec.qmax}] for {fmt}")
    q = pack_bits(codes, spec.bits)
    return q.view(torch.int8) if spec.code_dtype == torch.int8 else q


# ---------------------------------------------------------------- encoding with given scales
# Quantization-aware training learns the scales; ts.convert then needs the codes of a
# weight under those scales, encoded exactly as quantize_lowbit encodes under its own.

E4M3_MIN_SUBNORMAL = 2.0 ** -9  # the smallest positive E4M3 value (code 0x01)
E4M3_MAX_SCALE_CODE = 0x7E  # 448; 0x7F is NaN and codes >= 0x80 are negative
E8M0_NAN_CODE = 255


def float_codes_with_scales(x: torch.Tensor, spec: FormatSpec, scales: torch.Tensor,
                            tensor_scale: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """[rows, cols] int32 element codes of x under the given stored scales (fp32 for FP8, E4M3
    bytes + tensor scale for NVFP4, E8M0 bytes for MXFP4): the arithmetic of
    quantize_lowbit_reference with its scale computation replaced by these scales. No checks
    (quantize_lowbit_with_scales is the checked entry point)."""
    rows, cols = x.shape
    if x.numel() == 0:
        return torch.zeros(rows, cols, dtype=torch.int32, device=x.device)
    srows, scols = scale_shape(spec, rows, cols, group_size)
    # per tensor: one [rows, 1, cols] group; a short last group zero-padded (codes cut below)
    g = _grouped(x.float(), scols, group_width(group_size, cols, scols))
    s = scales.reshape(srows, scols, 1)
    if spec.name in ("fp8_e4m3", "fp8_e5m2"):
        enc = e4m3_encode if spec.name == "fp8_e4m3" else e5m2_encode
        codes = enc(g / s.float())
    elif spec.name == "nvfp4":
        scale = e4m3_decode(s) * tensor_scale.reshape(()).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.where(scale > 0, e2m1_encode(g / safe), torch.zeros_like(g, dtype=torch.int32))
    elif spec.name == "mxfp4":
        codes = e2m1_encode(g / e8m0_decode(s))
    else:
        raise ValueError(f"float_codes_with_scales: {spec.name} is not a float format "
                         "(fp8_e4m3, fp8_e5m2, nvfp4, mxfp4)")
    return codes.flatten(1)[:, :cols]


def _check_given_scales(spec: FormatSpec, scales: torch.Tensor, tensor_scale: Optional[torch.Tensor],
                        shape: Tuple[int, int]) -> None:
    what = f"quantize_lowbit_with_scales ({spec.name})"
    if tuple(scales.shape) != shape or scales.dtype != spec.scale_dtype:
        raise ValueError(f"{what}: scales must be {spec.scale_dtype} of shape {shape}, got "
                         f"{scales.dtype} of shape {tuple(scales.shape)}")
    if spec.scale_format == "float32" and scales.numel() and not bool(torch.all(torch.isfinite(scales) & (scales > 0))):
        raise ValueError(f"{what}: scales must be finite and > 0")
    if spec.scale_format == "e4m3" and scales.numel() and int(scales.max()) > E4M3_MAX_SCALE_CODE:
        raise ValueError(f"{what}: E4M3 block scales must be codes 0..0x7E (0x7F is NaN, "
                         f">= 0x80 negative), got {int(scales.max()):#x}")
    if spec.scale_format == "e8m0" and scales.numel() and int(scales.max()) == E8M0_NAN_CODE:
        raise ValueError(f"{what}: E8M0 block scale 255 is NaN")
    if spec.has_tensor_scale:
        if tensor_scale is None or tensor_scale.numel() != 1 or tensor_scale.dtype != torch.float32:
            raise ValueError(f"{what}: needs tensor_scale, one float32 value")
        if not (math.isfinite(float(tensor_scale)) and float(tensor_scale) > 0):
            raise ValueError(f"{what}: tensor_scale must be finite and > 0, got {float(tensor_scale)}")
    elif tensor_scale is not None:
        raise ValueError(f"{what}: the format has no tensor scale, got one")


def quantize_lowbit_with_scales(x: torch.Tensor, fmt: str, scales: torch.Tensor,
                                tensor_scale: Optional[torch.Tensor] = None,
                                group_size: Optional[int] = None) -> torch.Tensor:
    """Packed codes (quantize_lowbit's `q`) of a 2-D float tensor under given scales, in
    the float formats (FP8, NVFP4, MXFP4); scales in their stored form, as quantize_lowbit
    returns them. Given quantize_lowbit's own scales, the result is its q bit for bit
    (round to nearest even, saturating). Integer codes: use pack_codes."""
    spec = get_format(fmt)
    if not spec.is_float:
        raise ValueError(f"quantize_lowbit_with_scales: {fmt} is not a float format "
                         "(fp8_e4m3, fp8_e5m2, nvfp4, mxfp4); for integer codes use pack_codes")
    _check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if group_size is None:
        group_size = default_group_size(spec)
    shape = scale_shape(spec, x.shape[0], x.shape[1], group_size)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"quantize_lowbit_with_scales ({fmt}): x contains NaN or Inf; "
                         "quantization needs finite values")
    _check_given_scales(spec, scales, tensor_scale, shape)
    codes = float_codes_with_scales(x, spec, scales, tensor_scale, group_size)
    return pack_bits(codes, spec.bits)
