"""W4A8: INT4 weights (int4 / uint4 rows of the format table, grouped fp32 scales) times INT8
activations quantized per token at run time, with integer group dot products.

The specification is in include/tensorslim/gemm_w4a8.h; linear_w4a8_reference below
implements it in plain PyTorch and gives the native kernels' bits exactly:
  q, a_s = per-token int8 codes and scales of x (ops.quantize_per_token, the same quantizer)
  d[m, n, g] = sum over group g of (code[n, k] - offset[n, g]) * q[m, k]   (exact integers)
  acc = 0; for each group in order: acc = acc + float32(d) * w_scale[n, g]
  y = acc * a_s[m] (+ bias[n]), in x's dtype (bf16: computed in fp32, rounded once).
"""
from typing import Optional

import torch

from .. import _views
from . import _eager
from .._native import _C
from ..formats import get_format
from .int8 import quantize_per_token_reference
from .weight_only import unpack_int4

# "reference" is the plain-PyTorch specification below; the others are native paths:
# "scalar" is the C++ reference, "native" the AVX-512 / AVX2 kernel, "auto" native where it fits.
W4A8_BACKENDS = {"auto": 0, "scalar": 1, "native": 2}
W4A8_FORMATS = ("int4", "uint4")


def _check_backend(backend: str) -> None:
    if backend != "reference" and backend not in W4A8_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of "
                         f"{sorted(W4A8_BACKENDS) + ['reference']}")


def check_group_size(in_features: int, group_size: int) -> int:
    """Number of scale groups per row, ceil(in_features / group_size) (the last group holds what
    is left when the group does not divide the row); ValueError naming the problem otherwise."""
    if group_size == in_features:
        return 1
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size {group_size!r} must be in_features ({in_features}, one scale per "
                         f"output channel) or an even positive size")
    return -(-in_features // group_size)


def _check_tensor(t, what: str, dtype: torch.dtype, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{what}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{what}: linear_w4a8 runs on the CPU, got a tensor on {t.device}")


def _check_args(x, qweight, scales, zero_points, bias, fmt: str, group_size: int, in_features: int):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x: expected float32, bfloat16 or float16 activations, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"x: linear_w4a8 runs on the CPU, got a tensor on {x.device}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features}, got shape {list(x.shape)}")
    if fmt not in W4A8_FORMATS:
        raise ValueError(f"linear_w4a8: weights must be one of {W4A8_FORMATS}, got {fmt!r}")
    spec = get_format(fmt)
    groups = check_group_size(in_features, group_size)
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise ValueError("qweight: expected a 2-D uint8 tensor [out_features, ceil(in_features / 2)]")
    N = qweight.shape[0]
    _check_tensor(qweight, "qweight", torch.uint8, (N, spec.packed_cols(in_features)))
    _check_tensor(scales, "scales", torch.float32, (N, groups))
    if spec.has_zero_point:
        if zero_points is None:
            raise ValueError(f"format {fmt} needs zero_points")
        _check_tensor(zero_points, "zero_points", torch.uint8, (N, groups))
    elif zero_points is not None:
        raise ValueError(f"format {fmt} is symmetric and has no zero points")
    if bias is not None:
        _check_tensor(bias, "bias", torch.float32, (N,))


# ---------------------------------------------------------------- native op


def _linear_w4a8_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
                 group_size: int, backend: int, packed: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype)
    _C.linear_w4a8(_views.view(x, "x"), _views.view(qweight, "qweight"), _views.view(scales, "scales"),
                   _views.optional_view(zero_points, "zero_points"), _views.optional_view(bias, "bias"),
                   get_format(fmt).id, group_size, _views.view(out, "out"), backend,
                   _views.optional_view(packed, "packed"))
    return out


_linear_w4a8 = torch.library.custom_op("tensorslim::linear_w4a8", mutates_args=(),
                                   device_types="cpu")(_linear_w4a8_impl)


@_linear_w4a8.register_fake
def _linear_w4a8_fake(x, qweight, scales, zero_points, bias, fmt, group_size, backend, packed):
    return x.new_empty(x.shape[0], qweight.shape[0])


def pack_w4a8_weight(qweight: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                     fmt: str, group_size: int, in_features: int) -> Optional[torch.Tensor]:
    """The weights laid out for the native kernels (uint8 bytes; layout in
    include/tensorslim/gemm_w4a8.h): 16 rows' codes side by side per 64-byte step, so the kernel
    reads one stream and sums each row in its own lane, and no call transposes weights.
    linear_w4a8(packed=...) reads it at every token count; None where no native kernel takes
    the shape. Derived data, the size of qweight plus its scales: never saved."""
    if fmt not in W4A8_FORMATS:
        raise ValueError(f"pack_w4a8_weight: weights must be one of {W4A8_FORMATS}, got {fmt!r}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise TypeError(f"qweight: expected a 2-D uint8 tensor [out_features, ceil(in_features / 2)], "
                        f"got {type(qweight).__name__}")
    spec = get_format(fmt)
    n = _C.linear_w4a8_packed_bytes(qweight.shape[0], in_features, group_size, spec.id)
    if n <= 0:
        return None
    packed = torch.empty(n, dtype=torch.uint8)
    _C.linear_w4a8_pack(_views.view(qweight, "qweight"), _views.view(scales, "scales"),
                        _views.optional_view(zero_points, "zero_points"), spec.id, in_features, group_size,
                        _views.view(packed, "packed"))
    return packed


def packing_pays() -> bool:
    """Whether the active ISA has a native kernel, which would read pack_w4a8_weight's copy."""
    return _C.linear_w4a8_packing_pays()


def linear_w4a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
                group_size: int, in_features: int, backend: str = "auto",
                packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = quant8(x) @ dequantize(qweight).T + bias for x [..., in_features] (float32,
    bfloat16, or float16 computed in fp32; y has x's dtype). qweight: int4 / uint4 codes [out, ceil(in / 2)] as
    ops.quantize packs them; scales fp32 [out, ceil(in / group_size)]; zero points uint8 (uint4).
    packed: pack_w4a8_weight of these weights (or None), read instead of them where a native
    kernel runs; the same bits."""
    _check_backend(backend)
    _check_args(x, qweight, scales, zero_points, bias, fmt, group_size, in_features)
    if packed is not None and (not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8
                               or packed.dim() != 1 or packed.device.type != "cpu"):
        raise TypeError("packed: expected pack_w4a8_weight's 1-D uint8 CPU tensor")
    lead, dtype = x.shape[:-1], x.dtype
    x2 = x.reshape(-1, in_features)
    if dtype == torch.float16:  # the kernel reads fp32 / bf16; fp16 goes through fp32, like weight-only
        x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if backend == "reference":
        y = linear_w4a8_reference(x2, qweight, scales, zero_points, bias, fmt, group_size)
    else:
        y = _eager.call(_linear_w4a8, _linear_w4a8_impl, x2, qweight, scales, zero_points, bias, fmt,
                        group_size, W4A8_BACKENDS[backend], packed)
    return y.to(dtype).reshape(*lead, qweight.shape[0])


def kernel_name(in_features: int, group_size: int) -> str:
    """The kernel backend="auto" runs: "avx512_vnni", "avx512bw", "avx2_vnni" (the AVX2 kernels on
    256-bit vpdpbusd, _C.avx2_vnni()), "avx2" or "reference" (scalar C++)."""
    return _C.linear_w4a8_kernel(in_features, group_size)


# ---------------------------------------------------------------- plain-PyTorch specification


def linear_w4a8_reference(x: torch.Tensor, qweight, scales, zero_points, bias, fmt: str,
                          group_size: int) -> torch.Tensor:
    """The specification for x [M, K], bit for bit."""
    spec = get_format(fmt)
    M, K = x.shape
    N, groups = scales.shape
    q, a_s = quantize_per_token_reference(x.float())  # ValueError on NaN / Inf
    codes = unpack_int4(qweight, K, signed=not spec.has_zero_point)
    size = (K if groups == 1 else group_size) if groups else 0
    if spec.has_zero_point:
        codes = codes - zero_points.to(torch.int32).repeat_interleave(size, dim=1)[:, :K]
    # Integer group dots, exact in float64 (every partial sum is an integer below 2^53); a short
    # last group is zero-padded on both sides.
    pad = groups * size - K
    d = torch.einsum("mgk,ngk->mng", torch.nn.functional.pad(q.double(), (0, pad)).reshape(M, groups, size),
                     torch.nn.functional.pad(codes.double(), (0, pad)).reshape(N, groups, size))
    acc = torch.zeros(M, N)
    for g in range(groups):  # in order, one rounding per product and per sum (no fma)
        acc = acc + d[:, :, g].float() * scales[:, g]
    y = acc * a_s[:, None]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
