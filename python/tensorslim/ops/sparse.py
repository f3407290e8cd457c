"""Sparse weight storage and sparse x dense linears (docs/formats.md, "Sparse storage").

N:M ("nm"), m in {4, 8}, 1 <= n < m: per row G = ceil(K / m) groups of m columns, n slots each.
  values  [N, G*n] float32 / bfloat16 / float16 / int8 (int8: w ~= code * scales[row]), or
          uint8 [N, 8 * ceil(G*n / 16)]: int4 codes in [-7, 7], w ~= code * scales[row], each
          row a run of little-endian 64-bit words of 16 slots: the even slots' nibbles in the
          low 32 bits, the odd ones' in the high 32, each in order (pack_int4)
  indices [N, ceil(G*n*b / 8)] uint8, b = 2 (m = 4) or 3 (m = 8): the in-group positions as a
          little-endian bit stream per row, slot after slot, increasing within a group.
  Free slots of a group hold its smallest unused positions with value 0; in the last group,
  positions >= K - (G-1)*m are virtual zero columns.
CSR ("csr"): values [nnz] float32 / int8, cols uint16 [nnz] (K <= 65536), row_ptr int64 [N+1].
int8 / int4 values: scale = max|kept| / qmax per row (qmax 127 / 7; 1.0 when nothing nonzero
is kept), code = clamp(round_half_even(w / scale), -qmax, qmax), in float32.

Packing runs once, in the native core (on a CPU copy). The linears are torch.library ops
(`tensorslim::nm_linear`, `tensorslim::csr_linear`, and the unpacks) with fake impls; the
plain-PyTorch references (backend="reference", and tensors that are not on the CPU) unpack
the weight and call F.linear.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _views
from . import _eager, decode_gemm
from .._native import _C

SPARSE_BACKENDS = ("auto", "native", "reference")
INT4_VALUES = torch.uint8  # N:M values stored as int4 codes, two per byte
NM_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, INT4_VALUES)
CODE_MAX = {torch.int8: 127, INT4_VALUES: 7}  # values stored as integer codes with per-row scales
CSR_VALUE_DTYPES = (torch.float32, torch.int8)
CSR_MAX_IN_FEATURES = 65536  # 16-bit column indices


# ---------------------------------------------------------------- argument checks


def _check_nm_args(n, m, fn: str) -> None:
    if not isinstance(m, int) or m not in (4, 8):
        raise ValueError(f"{fn}: m must be 4 or 8, got {m!r}")
    if not isinstance(n, int) or not 1 <= n < m:
        raise ValueError(f"{fn}: n must be an int with 1 <= n < m = {m}, got {n!r}")


def _check_backend(backend, fn: str) -> None:
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {SPARSE_BACKENDS}, got {backend!r}")


def _check_tensor(t, what: str, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {what} must be a tensor, got {type(t).__name__}")


def _check_w_keep(w, keep, fn: str) -> None:
    _check_tensor(w, "w", fn)
    _check_tensor(keep, "keep", fn)
    if w.dim() != 2:
        raise ValueError(f"{fn}: w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{fn}: w must be a float tensor, got {w.dtype}")
    if keep.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{fn}: keep must be bool or uint8, got {keep.dtype}")
    if keep.shape != w.shape:
        raise ValueError(f"{fn}: keep must have w's shape {tuple(w.shape)}, got {tuple(keep.shape)}")


def _check_scales(values, scales, rows: int, fn: str) -> None:
    if values.dtype in CODE_MAX:
        if scales is None:
            raise ValueError(f"{fn}: {_value_name(values.dtype)} values need float32 scales [{rows}]")
        _check_tensor(scales, "scales", fn)
        if scales.dtype != torch.float32 or tuple(scales.shape) != (rows,):
            raise ValueError(f"{fn}: scales must be float32 [{rows}], got {scales.dtype} {tuple(scales.shape)}")
    elif scales is not None:
        raise ValueError(f"{fn}: scales are only for int8 / int4 values, got {values.dtype} values")


def _value_name(dtype: torch.dtype) -> str:
    return "int4" if dtype == INT4_VALUES else str(dtype).replace("torch.", "")


def _check_bias(bias, rows: int, fn: str) -> None:
    if bias is None:
        return
    _check_tensor(bias, "bias", fn)
    if bias.dtype != torch.float32 or tuple(bias.shape) != (rows,):
        raise ValueError(f"{fn}: bias must be float32 [{rows}], got {bias.dtype} {tuple(bias.shape)}")


def nm_shapes(out_features: int, in_features: int, n: int, m: int,
              value_dtype: torch.dtype = torch.float32) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(values shape, indices shape) of an N:M packed [out_features, in_features] weight (int4
    values, uint8: whole 8-byte words of 16 slots per row)."""
    slots = (in_features + m - 1) // m * n
    bits = 2 if m == 4 else 3
    vcols = (slots + 15) // 16 * 8 if value_dtype == INT4_VALUES else slots
    return (out_features, vcols), (out_features, (slots * bits + 7) // 8)


def _check_nm(values, indices, scales, n, m, in_features, fn: str) -> int:
    _check_nm_args(n, m, fn)
    _check_tensor(values, "values", fn)
    _check_tensor(indices, "indices", fn)
    if not isinstance(in_features, int) or in_features < 0:
        raise ValueError(f"{fn}: in_features must be a non-negative int, got {in_features!r}")
    if values.dtype not in NM_VALUE_DTYPES:
        raise TypeError(f"{fn}: values must be one of {NM_VALUE_DTYPES}, got {values.dtype}")
    if values.dim() != 2:
        raise ValueError(f"{fn}: values must be 2-D [out_features, slots], got shape {tuple(values.shape)}")
    rows = values.shape[0]
    vshape, ishape = nm_shapes(rows, in_features, n, m, values.dtype)
    if tuple(values.shape) != vshape:
        raise ValueError(f"{fn}: values must be {list(vshape)} for {n}:{m} with in_features {in_features}, "
                         f"got {list(values.shape)}")
    if indices.dtype != torch.uint8 or tuple(indices.shape) != ishape:
        raise ValueError(f"{fn}: indices must be uint8 {list(ishape)}, got {indices.dtype} {list(indices.shape)}")
    _check_scales(values, scales, rows, fn)
    return rows


def _check_csr(values, cols, row_ptr, scales, in_features, fn: str) -> int:
    for t, what in ((values, "values"), (cols, "cols"), (row_ptr, "row_ptr")):
        _check_tensor(t, what, fn)
    if not isinstance(in_features, int) or not 1 <= in_features <= CSR_MAX_IN_FEATURES:
        raise ValueError(f"{fn}: in_features must be an int in [1, {CSR_MAX_IN_FEATURES}] (16-bit column "
                         f"indices), got {in_features!r}")
    if values.dtype not in CSR_VALUE_DTYPES or values.dim() != 1:
        raise TypeError(f"{fn}: values must be 1-D float32 or int8, got {values.dtype} {tuple(values.shape)}")
    if cols.dtype != torch.uint16 or tuple(cols.shape) != tuple(values.shape):
        raise ValueError(f"{fn}: cols must be uint16 [{values.shape[0]}], got {cols.dtype} {tuple(cols.shape)}")
    if row_ptr.dtype != torch.int64 or row_ptr.dim() != 1 or row_ptr.shape[0] < 1:
        raise ValueError(f"{fn}: row_ptr must be int64 [out_features + 1], got {row_ptr.dtype} "
                         f"{tuple(row_ptr.shape)}")
    rows = row_ptr.shape[0] - 1
    _check_scales(values, scales, rows, fn)
    return rows


def _check_x(x, in_features: int, fn: str) -> None:
    _check_tensor(x, "x", fn)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: x must be a float tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{fn}: x must be [..., {in_features}], got shape {tuple(x.shape)}")


def _on_cpu(*ts) -> bool:
    return all(t is None or t.device.type == "cpu" for t in ts)


def _c(t):
    return None if t is None else t.contiguous()


# ---------------------------------------------------------------- packing


def coded_values_reference(kept: torch.Tensor, qmax: int = 127) -> Tuple[torch.Tensor, torch.Tensor]:
    """The int8 (qmax 127) / int4 (qmax 7) rule in plain PyTorch (float32 throughout): codes and
    per-row scales."""
    amax = kept.abs().amax(dim=1) if kept.shape[1] else kept.new_zeros(kept.shape[0])
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.round(kept / scales[:, None]).clamp(-qmax, qmax)
    return codes, scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [rows, slots] (integers in [-8, 7]) as the uint8 [rows, 8 * ceil(slots / 16)]
    values of N:M storage: per 16 slots one little-endian 64-bit word whose nibble (k % 2) * 8 +
    k // 2 holds slot k (nibble t: bits 4 (t % 2) .. of byte t // 2); unused nibbles 0."""
    rows, slots = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.int32) & 0x0F, (0, -slots % 16)).reshape(rows, -1, 16)
    nib = torch.cat([c[..., 0::2], c[..., 1::2]], dim=2)  # nibble order: even slots, then odd
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8).reshape(rows, -1)


def unpack_int4(values: torch.Tensor, slots: int) -> torch.Tensor:
    """The int4 codes [rows, slots] (int8) of uint8 N:M values; pack_int4's inverse."""
    v = values.to(torch.int32).reshape(values.shape[0], -1, 8)
    nib = torch.stack([v & 0x0F, v >> 4], dim=3).reshape(values.shape[0], -1, 16)
    c = torch.stack([nib[..., :8], nib[..., 8:]], dim=3).reshape(values.shape[0], -1)[:, :slots]
    return torch.where(c >= 8, c - 16, c).to(torch.int8)


def nm_pack(w: torch.Tensor, keep: torch.Tensor, n: int, m: int,
            value_dtype: torch.dtype = torch.float32):
    """Packs w * keep as N:M: (values, indices, scales or None), on w's device; value_dtype
    uint8 (INT4_VALUES) stores int4 codes. keep must have at most n nonzeros in every group of m
    columns (ValueError naming the row and group otherwise)."""
    fn = "nm_pack"
    _check_nm_args(n, m, fn)
    _check_w_keep(w, keep, fn)
    if value_dtype not in NM_VALUE_DTYPES:
        raise TypeError(f"{fn}: value_dtype must be one of {NM_VALUE_DTYPES}, got {value_dtype!r}")
    wc = w.detach().to("cpu", torch.float32).contiguous()
    kc = keep.detach().to("cpu", torch.uint8).contiguous()
    if value_dtype == torch.float16 and wc.numel():  # narrowing would store +-inf silently
        big = float((wc * kc).abs().max())
        if big > torch.finfo(torch.float16).max:
            raise ValueError(f"{fn}: a kept weight of magnitude {big:.4g} is beyond float16's range "
                             f"(65504); store bfloat16, float32 or int8 values")
    vshape, ishape = nm_shapes(w.shape[0], w.shape[1], n, m, value_dtype)
    values = torch.empty(vshape, dtype=value_dtype)
    indices = torch.empty(ishape, dtype=torch.uint8)
    scales = torch.empty(w.shape[0], dtype=torch.float32) if value_dtype in CODE_MAX else None
    _C.nm_pack(_views.view(wc, "w"), _views.view(kc, "keep"), n, m, _views.view(values, "values"),
               _views.view(indices, "indices"), _views.optional_view(scales, "scales"))
    dev = w.device
    return values.to(dev), indices.to(dev), None if scales is None else scales.to(dev)


def csr_pack(w: torch.Tensor, keep: torch.Tensor, value_dtype: torch.dtype = torch.float32):
    """Packs w * keep as CSR: (values, cols, row_ptr, scales or None), on w's device."""
    fn = "csr_pack"
    _check_w_keep(w, keep, fn)
    if value_dtype not in CSR_VALUE_DTYPES:
        raise TypeError(f"{fn}: value_dtype must be float32 or int8, got {value_dtype!r}")
    if w.shape[1] > CSR_MAX_IN_FEATURES:
        raise ValueError(f"{fn}: in_features {w.shape[1]} is over {CSR_MAX_IN_FEATURES}, the most 16-bit "
                         "column indices address")
    wc = w.detach().to("cpu", torch.float32).contiguous()
    kc = keep.detach().to("cpu", torch.uint8).contiguous()
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    torch.cumsum((kc != 0).sum(dim=1), dim=0, out=row_ptr[1:])
    nnz = int(row_ptr[-1])
    values = torch.empty(nnz, dtype=value_dtype)
    cols = torch.empty(nnz, dtype=torch.uint16)
    scales = torch.empty(w.shape[0], dtype=torch.float32) if value_dtype == torch.int8 else None
    _C.csr_pack(_views.view(wc, "w"), _views.view(kc, "keep"), _views.view(row_ptr, "row_ptr"),
                _views.view(values, "values"), _views.view(cols, "cols"), _views.optional_view(scales, "scales"))
    dev = w.device
    return values.to(dev), cols.to(dev), row_ptr.to(dev), None if scales is None else scales.to(dev)


# ---------------------------------------------------------------- custom ops (native CPU)


def _nm_unpack_impl(values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor], n: int, m: int,
                    in_features: int) -> torch.Tensor:
    out = torch.empty(values.shape[0], in_features, dtype=torch.float32)
    _C.nm_unpack(_views.view(values, "values"), _views.view(indices, "indices"),
                 _views.optional_view(scales, "scales"), n, m, _views.view(out, "out"))
    return out


_nm_unpack = torch.library.custom_op("tensorslim::nm_unpack", mutates_args=(), device_types="cpu")(_nm_unpack_impl)


@_nm_unpack.register_fake
def _nm_unpack_fake(values, indices, scales, n, m, in_features):
    return values.new_empty(values.shape[0], in_features, dtype=torch.float32)


def _csr_unpack_impl(values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, scales: Optional[torch.Tensor],
                     in_features: int) -> torch.Tensor:
    out = torch.empty(row_ptr.shape[0] - 1, in_features, dtype=torch.float32)
    _C.csr_unpack(_views.view(values, "values"), _views.view(cols, "cols"), _views.view(row_ptr, "row_ptr"),
                  _views.optional_view(scales, "scales"), _views.view(out, "out"))
    return out


_csr_unpack = torch.library.custom_op("tensorslim::csr_unpack", mutates_args=(), device_types="cpu")(_csr_unpack_impl)


@_csr_unpack.register_fake
def _csr_unpack_fake(values, cols, row_ptr, scales, in_features):
    return values.new_empty(row_ptr.shape[0] - 1, in_features, dtype=torch.float32)


def _workspace(rows: int, in_features: int):
    size = _C.sparse_linear_workspace(rows, in_features)
    return torch.empty(size, dtype=torch.float32) if size else None


def _nm_linear_impl(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], values.shape[0], dtype=torch.float32)
    ws = _workspace(x.shape[0], x.shape[1])
    _C.nm_linear(_views.view(x, "x"), _views.view(values, "values"), _views.view(indices, "indices"),
                 _views.optional_view(scales, "scales"), _views.optional_view(bias, "bias"), n, m,
                 _views.view(out, "out"), _views.optional_view(ws, "workspace"))
    return out


_nm_linear = torch.library.custom_op("tensorslim::nm_linear", mutates_args=(), device_types="cpu")(_nm_linear_impl)


@_nm_linear.register_fake
def _nm_linear_fake(x, values, indices, scales, bias, n, m):
    return x.new_empty(x.shape[0], values.shape[0], dtype=torch.float32)


def _csr_linear_impl(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
                scales: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(x.shape[0], row_ptr.shape[0] - 1, dtype=torch.float32)
    ws = _workspace(x.shape[0], x.shape[1])
    _C.csr_linear(_views.view(x, "x"), _views.view(values, "values"), _views.view(cols, "cols"),
                  _views.view(row_ptr, "row_ptr"), _views.optional_view(scales, "scales"),
                  _views.optional_view(bias, "bias"), _views.view(out, "out"), _views.optional_view(ws, "workspace"))
    return out


_csr_linear = torch.library.custom_op("tensorslim::csr_linear", mutates_args=(), device_types="cpu")(_csr_linear_impl)


@_csr_linear.register_fake
def _csr_linear_fake(x, values, cols, row_ptr, scales, bias):
    return x.new_empty(x.shape[0], row_ptr.shape[0] - 1, dtype=torch.float32)


# ---------------------------------------------------------------- references (plain PyTorch)


def nm_unpack_reference(values, indices, scales, n: int, m: int, in_features: int) -> torch.Tensor:
    rows = values.shape[0]
    slots = (in_features + m - 1) // m * n
    if values.dtype == INT4_VALUES:
        values = unpack_int4(values, slots)
    bits = 2 if m == 4 else 3
    dev = values.device
    stream = (indices.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=dev, dtype=torch.int32)) & 1
    stream = stream.reshape(rows, -1)[:, :slots * bits].reshape(rows, slots, bits)
    pos = (stream * (1 << torch.arange(bits, device=dev, dtype=torch.int32))).sum(-1)
    cols = (torch.arange(slots, device=dev) // n * m)[None, :] + pos
    vals = values.float() if scales is None else values.float() * scales[:, None]
    w = torch.zeros(rows, (slots // n) * m, dtype=torch.float32, device=dev)
    w.scatter_(1, cols.long(), vals)
    return w[:, :in_features].contiguous()


def csr_unpack_reference(values, cols, row_ptr, scales, in_features: int) -> torch.Tensor:
    rows = row_ptr.shape[0] - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    r = torch.repeat_interleave(torch.arange(rows, device=values.device), counts)
    vals = values.float() if scales is None else values.float() * scales[r]
    w = torch.zeros(rows, in_features, dtype=torch.float32, device=values.device)
    w[r, cols.to(torch.int32).long()] = vals
    return w


# ---------------------------------------------------------------- public functions


def nm_unpack(values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor], n: int, m: int,
              in_features: int) -> torch.Tensor:
    """The dense float32 [N, in_features] weight an N:M packed one stands for."""
    _check_nm(values, indices, scales, n, m, in_features, "nm_unpack")
    if _on_cpu(values, indices, scales):
        return _nm_unpack(values.contiguous(), indices.contiguous(), _c(scales), n, m, in_features)
    return nm_unpack_reference(values, indices, scales, n, m, in_features)


def csr_unpack(values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, scales: Optional[torch.Tensor],
               in_features: int) -> torch.Tensor:
    """The dense float32 [N, in_features] weight a CSR one stands for."""
    _check_csr(values, cols, row_ptr, scales, in_features, "csr_unpack")
    if _on_cpu(values, cols, row_ptr, scales):
        return _csr_unpack(values.contiguous(), cols.contiguous(), row_ptr.contiguous(), _c(scales), in_features)
    return csr_unpack_reference(values, cols, row_ptr, scales, in_features)


def _pick(backend: str, tensors, fn: str) -> bool:
    """True for the native kernel."""
    _check_backend(backend, fn)
    if backend == "reference":
        return False
    if not _on_cpu(*tensors):
        if backend == "native":
            raise ValueError(f"{fn}: backend='native' needs CPU tensors; use 'auto' or 'reference'")
        return False
    return True


def _direct_ok(x2: torch.Tensor, backend: str, tensors) -> bool:
    return (backend != "reference" and x2.dtype == torch.float32 and x2.dim() == 2 and x2.is_contiguous()
            and _eager.direct_ok((x2, *tensors)))


def _nm_decodes(x2: torch.Tensor, backend: str, values: torch.Tensor, n: int, m: int) -> bool:
    rows = values.shape[0]
    in_features = x2.shape[-1]
    return decode_gemm.sparse_applies(x2, backend, rows * in_features, n / m)


def _csr_decodes(x2: torch.Tensor, backend: str, values: torch.Tensor, row_ptr: torch.Tensor) -> bool:
    dense = (row_ptr.shape[0] - 1) * x2.shape[-1]
    return decode_gemm.sparse_applies(x2, backend, dense, values.numel() / max(1, dense))


def _nm_decode_gemm(x2, values, indices, scales, bias, n: int, m: int) -> torch.Tensor:
    in_features = x2.shape[1]
    return decode_gemm.linear(x2, lambda: _eager.call(_nm_unpack, _nm_unpack_impl, values, indices, scales, n, m,
                                                      in_features), bias)


def _csr_decode_gemm(x2, values, cols, row_ptr, scales, bias) -> torch.Tensor:
    in_features = x2.shape[1]
    return decode_gemm.linear(x2, lambda: _eager.call(_csr_unpack, _csr_unpack_impl, values, cols, row_ptr, scales,
                                                      in_features), bias)


def nm_linear_direct(x2: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], n: int, m: int, backend: str) -> Optional[torch.Tensor]:
    """nm_linear for a layer's own packed tensors and a contiguous float32 [rows, in_features]
    input the layer has checked, in the common case (eager, CPU, nothing for the dispatcher to
    do): the same CPU function with the same arguments, so the same bits, without the per-call
    argument checks in Python (the native core checks the tensors again). None where the case
    does not hold: the caller then calls nm_linear."""
    if not _direct_ok(x2, backend, (values, indices, scales, bias)):
        return None
    if _nm_decodes(x2, backend, values, n, m):
        return _nm_decode_gemm(x2, values, indices, scales, bias, n, m)
    return _nm_linear_impl(x2, values, indices, scales, bias, n, m)


def csr_linear_direct(x2: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
                      scales: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      backend: str) -> Optional[torch.Tensor]:
    """csr_linear's direct call, as nm_linear_direct."""
    if not _direct_ok(x2, backend, (values, cols, row_ptr, scales, bias)):
        return None
    if _csr_decodes(x2, backend, values, row_ptr):
        return _csr_decode_gemm(x2, values, cols, row_ptr, scales, bias)
    return _csr_linear_impl(x2, values, cols, row_ptr, scales, bias)


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], n: int, m: int, in_features: int, backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T (+ bias) for an N:M packed W; x is [..., in_features], y [..., out_features]."""
    fn = "nm_linear"
    rows = _check_nm(values, indices, scales, n, m, in_features, fn)
    _check_x(x, in_features, fn)
    _check_bias(bias, rows, fn)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).float()
    if not _pick(backend, (x, values, indices, scales, bias), fn):
        y = F.linear(x2, nm_unpack_reference(values, indices, scales, n, m, in_features), bias)
    elif _nm_decodes(x2, backend, values, n, m):
        y = _nm_decode_gemm(x2.contiguous(), values.contiguous(), indices.contiguous(), _c(scales), bias, n, m)
    else:
        y = _eager.call(_nm_linear, _nm_linear_impl, x2.contiguous(), values.contiguous(), indices.contiguous(),
                        _c(scales), _c(bias), n, m)
    return y.to(x.dtype).reshape(*lead, rows)


def csr_linear(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
               scales: Optional[torch.Tensor], bias: Optional[torch.Tensor], in_features: int,
               backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T (+ bias) for a CSR W; x is [..., in_features], y [..., out_features]."""
    fn = "csr_linear"
    rows = _check_csr(values, cols, row_ptr, scales, in_features, fn)
    _check_x(x, in_features, fn)
    _check_bias(bias, rows, fn)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).float()
    if not _pick(backend, (x, values, cols, row_ptr, scales, bias), fn):
        y = F.linear(x2, csr_unpack_reference(values, cols, row_ptr, scales, in_features), bias)
    elif _csr_decodes(x2, backend, values, row_ptr):
        y = _csr_decode_gemm(x2.contiguous(), values.contiguous(), cols.contiguous(), row_ptr.contiguous(),
                             _c(scales), bias)
    else:
        y = _eager.call(_csr_linear, _csr_linear_impl, x2.contiguous(), values.contiguous(), cols.contiguous(),
                        row_ptr.contiguous(), _c(scales), _c(bias))
    return y.to(x.dtype).reshape(*lead, rows)
