"""Sparse 2-D convolutions: out = conv2d(x, W, groups) (+ bias) for a W [N, C/groups*kh*kw] stored as
N:M or CSR (ops/sparse.py's layouts, columns in torch's (c, ky, kx) order), zero padding.

The native core copies x into per-image input planes in which each weight column's inputs for
consecutive output positions lie contiguous, then runs the sparse linears' transposed kernels
on them (docs/formats.md, "Sparse convolutions"). torch.library ops `tensorslim::nm_conv2d` and
`tensorslim::csr_conv2d` with fake impls; the reference (backend="reference", tensors not on
the CPU) unpacks the weight and calls F.conv2d, as backend="auto" does on the CPU for weights
of about half kept or more (decode_gemm.sparse_conv_applies: faster than the kernels there).
"""
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _views
from .._native import _C
from . import _eager, decode_gemm
from . import sparse as S

# (kh, kw, sh, sw, ph, pw, dh, dw[, groups])
Geometry = Sequence[int]


def groups_of(geometry: Geometry) -> int:
    return int(geometry[8]) if len(geometry) > 8 else 1


def columns(in_channels: int, geometry: Geometry) -> int:
    """The weight matrix's columns: in_channels / groups * kh * kw."""
    return in_channels // groups_of(geometry) * geometry[0] * geometry[1]


def output_shape(x_shape, rows: int, geometry: Geometry):
    kh, kw, sh, sw, ph, pw, dh, dw = geometry[:8]
    B, _, H, W = x_shape
    return (B, rows, (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


_scratch = threading.local()


def _workspace(x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The input planes' buffer, kept per thread and grown as needed: a fresh multi-MiB
    allocation per call is fresh pages, and their first-touch faults cost as much as the
    convolution (64 -> 64 3 x 3 at 56 x 56, 90%: 0.80 ms per call against 0.32 reused)."""
    B, C, H, W = x.shape
    need = _C.sparse_conv2d_workspace(B, C, H, W, list(geometry))
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _scratch.buf = torch.empty(need, dtype=torch.float32)
    return buf[:need]


def _nm_conv2d_impl(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], n: int, m: int, geometry: Sequence[int]) -> torch.Tensor:
    out = torch.empty(output_shape(x.shape, values.shape[0], geometry), dtype=torch.float32)
    _C.nm_conv2d(_views.view(x, "x"), _views.view(values, "values"), _views.view(indices, "indices"),
                 _views.optional_view(scales, "scales"), _views.optional_view(bias, "bias"), n, m, list(geometry),
                 _views.view(out, "out"), _views.view(_workspace(x, geometry), "workspace"))
    return out


def _csr_conv2d_impl(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
                     scales: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     geometry: Sequence[int]) -> torch.Tensor:
    out = torch.empty(output_shape(x.shape, row_ptr.shape[0] - 1, geometry), dtype=torch.float32)
    _C.csr_conv2d(_views.view(x, "x"), _views.view(values, "values"), _views.view(cols, "cols"),
                  _views.view(row_ptr, "row_ptr"), _views.optional_view(scales, "scales"),
                  _views.optional_view(bias, "bias"), list(geometry), _views.view(out, "out"),
                  _views.view(_workspace(x, geometry), "workspace"))
    return out


_nm_conv2d = torch.library.custom_op("tensorslim::nm_conv2d", mutates_args=(), device_types="cpu")(_nm_conv2d_impl)
_csr_conv2d = torch.library.custom_op("tensorslim::csr_conv2d", mutates_args=(),
                                      device_types="cpu")(_csr_conv2d_impl)


@_nm_conv2d.register_fake
def _nm_conv2d_fake(x, values, indices, scales, bias, n, m, geometry):
    return x.new_empty(output_shape(x.shape, values.shape[0], geometry), dtype=torch.float32)


@_csr_conv2d.register_fake
def _csr_conv2d_fake(x, values, cols, row_ptr, scales, bias, geometry):
    return x.new_empty(output_shape(x.shape, row_ptr.shape[0] - 1, geometry), dtype=torch.float32)


def _check(x: torch.Tensor, in_channels: int, geometry: Geometry, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{fn}: x must be a 4-D tensor [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{fn}: x has {x.shape[1]} channels, the weight expects {in_channels}")
    if len(geometry) not in (8, 9) or min(geometry[:4]) < 1 or min(geometry[6:]) < 1 or min(geometry[4:6]) < 0:
        raise ValueError(f"{fn}: geometry must be (kh, kw, sh, sw, ph, pw, dh, dw[, groups]) with kernel, stride, "
                         f"dilation and groups >= 1 and padding >= 0, got {tuple(geometry)}")
    if in_channels % groups_of(geometry):
        raise ValueError(f"{fn}: groups = {groups_of(geometry)} does not divide the {in_channels} input channels")
    kh, kw, _, _, ph, pw, dh, dw = geometry[:8]
    if x.shape[2] + 2 * ph < dh * (kh - 1) + 1 or x.shape[3] + 2 * pw < dw * (kw - 1) + 1:
        raise ValueError(f"{fn}: the padded input {x.shape[2] + 2 * ph} x {x.shape[3] + 2 * pw} is smaller than "
                         f"the dilated kernel {dh * (kh - 1) + 1} x {dw * (kw - 1) + 1}")


def _decodes(x: torch.Tensor, backend: str, rows: int, in_channels: int, geometry: Geometry, density: float) -> bool:
    """Whether the weight is decoded for torch's dense conv (decode_gemm.sparse_conv_applies):
    about half the weights kept or more, where oneDNN's conv is faster than the kernels."""
    _, _, ho, wo = output_shape(x.shape, rows, geometry)
    return decode_gemm.sparse_conv_applies(x, backend, rows * columns(in_channels, geometry), density,
                                           x.shape[0] * ho * wo)


def _reference(x, dense: torch.Tensor, bias, in_channels: int, geometry: Geometry) -> torch.Tensor:
    kh, kw, sh, sw, ph, pw, dh, dw = geometry[:8]
    groups = groups_of(geometry)
    w = dense.reshape(dense.shape[0], in_channels // groups, kh, kw)
    return F.conv2d(x, w.to(x.device), bias, (sh, sw), (ph, pw), (dh, dw), groups)


def _nm_decoded(x, values, indices, scales, bias, n: int, m: int, in_channels: int, geometry: Geometry,
                backend: str) -> Optional[torch.Tensor]:
    """torch's conv on the decoded weight where _decodes says it is the faster one, else None."""
    if not _decodes(x, backend, values.shape[0], in_channels, geometry, n / m):
        return None
    dense = S.nm_unpack(values, indices, scales, n, m, columns(in_channels, geometry))
    return _reference(x, dense, bias, in_channels, geometry)


def _csr_decoded(x, values, cols, row_ptr, scales, bias, in_channels: int, geometry: Geometry,
                 backend: str) -> Optional[torch.Tensor]:
    """As _nm_decoded, for a CSR weight."""
    rows, k = row_ptr.shape[0] - 1, columns(in_channels, geometry)
    if not _decodes(x, backend, rows, in_channels, geometry, values.numel() / max(1, rows * k)):
        return None
    return _reference(x, S.csr_unpack(values, cols, row_ptr, scales, k), bias, in_channels, geometry)


def nm_conv2d(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], n: int, m: int, in_channels: int, geometry: Geometry,
              backend: str = "auto") -> torch.Tensor:
    """conv2d(x, W) (+ bias) for an N:M packed W [out_channels, in_channels / groups * kh * kw];
    float32 out."""
    fn = "nm_conv2d"
    rows = S._check_nm(values, indices, scales, n, m, columns(in_channels, geometry), fn)
    _check(x, in_channels, geometry, fn)
    S._check_bias(bias, rows, fn)
    xf = x.float()
    if not S._pick(backend, (x, values, indices, scales, bias), fn):
        dense = S.nm_unpack_reference(values, indices, scales, n, m, columns(in_channels, geometry))
        return _reference(xf, dense, bias, in_channels, geometry)
    y = _nm_decoded(xf, values, indices, scales, bias, n, m, in_channels, geometry, backend)
    if y is not None:
        return y
    return _eager.call(_nm_conv2d, _nm_conv2d_impl, xf.contiguous(), values.contiguous(), indices.contiguous(),
                       S._c(scales), S._c(bias), n, m, [int(v) for v in geometry])


def csr_conv2d(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
               scales: Optional[torch.Tensor], bias: Optional[torch.Tensor], in_channels: int, geometry: Geometry,
               backend: str = "auto") -> torch.Tensor:
    """conv2d(x, W) (+ bias) for a CSR W [out_channels, in_channels / groups * kh * kw]; float32 out."""
    fn = "csr_conv2d"
    rows = S._check_csr(values, cols, row_ptr, scales, columns(in_channels, geometry), fn)
    _check(x, in_channels, geometry, fn)
    S._check_bias(bias, rows, fn)
    xf = x.float()
    if not S._pick(backend, (x, values, cols, row_ptr, scales, bias), fn):
        dense = S.csr_unpack_reference(values, cols, row_ptr, scales, columns(in_channels, geometry))
        return _reference(xf, dense, bias, in_channels, geometry)
    y = _csr_decoded(xf, values, cols, row_ptr, scales, bias, in_channels, geometry, backend)
    if y is not None:
        return y
    return _eager.call(_csr_conv2d, _csr_conv2d_impl, xf.contiguous(), values.contiguous(), cols.contiguous(),
                       row_ptr.contiguous(), S._c(scales), S._c(bias), [int(v) for v in geometry])


def _direct_ok(x: torch.Tensor, backend: str, tensors) -> bool:
    return (backend != "reference" and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and _eager.direct_ok((x, *tensors)))


def nm_conv2d_direct(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], n: int, m: int, geometry: Geometry,
                     backend: str) -> Optional[torch.Tensor]:
    """nm_conv2d for a layer's own packed tensors and a contiguous float32 x the layer has checked,
    in the common case (eager, CPU): the same computation without the Python argument checks
    and the dispatcher (~0.1 ms a call; the native core checks the tensors again). None where
    the case does not hold: the caller then calls nm_conv2d."""
    if not _direct_ok(x, backend, (values, indices, scales, bias)):
        return None
    y = _nm_decoded(x, values, indices, scales, bias, n, m, x.shape[1], geometry, backend)
    return y if y is not None else _nm_conv2d_impl(x, values, indices, scales, bias, n, m, geometry)


def csr_conv2d_direct(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
                      scales: Optional[torch.Tensor], bias: Optional[torch.Tensor], geometry: Geometry,
                      backend: str) -> Optional[torch.Tensor]:
    """csr_conv2d's direct call, as nm_conv2d_direct."""
    if not _direct_ok(x, backend, (values, cols, row_ptr, scales, bias)):
        return None
    y = _csr_decoded(x, values, cols, row_ptr, scales, bias, x.shape[1], geometry, backend)
    return y if y is not None else _csr_conv2d_impl(x, values, cols, row_ptr, scales, bias, geometry)
