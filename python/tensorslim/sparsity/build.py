"""Sparse modules from a dense weight and a keep-mask, as each config stores them."""
from typing import Optional

import torch
from torch import nn

from ..nn.sparse_conv import CSRSparseConv1d, CSRSparseConv2d, NMSparseConv1d, NMSparseConv2d
from ..nn.sparse_linear import CODED_VALUES, VALUE_DTYPES, CSRSparseLinear, NMSparseLinear
from ..ops.sparse import CODE_MAX, pack_int4


def dense_linear(mod: nn.Module):
    """(weight [out, in] float, bias or None) of a Linear; a conv's weight as the [out, in * kernel]
    matrix its sparse form stores."""
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1), (mod.bias.detach() if mod.bias is not None else None)


def build_layer(layout: str, layer: nn.Module, keep: torch.Tensor, values: str, backend: str, n: int = 0,
                m: int = 0, weight: Optional[torch.Tensor] = None, scales: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> nn.Module:
    """The sparse module storing layer's weight (or `weight`, SparseGPT's updated one) * keep, both
    as the [out, columns] matrix dense_linear gives; scales as build's; bias: instead of the
    layer's (bias correction). A Conv1d / Conv2d becomes the sparse conv holding that matrix, a
    linear the sparse linear."""
    w, own_bias = dense_linear(layer)
    linear = build(layout, w if weight is None else weight, keep, own_bias if bias is None else bias, values,
                   backend, n, m, scales)
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return linear
    one_d = type(layer) is nn.Conv1d
    cls = {("nm", False): NMSparseConv2d, ("nm", True): NMSparseConv1d,
           ("csr", False): CSRSparseConv2d, ("csr", True): CSRSparseConv1d}[(layout, one_d)]
    return cls._from(layer, linear)


def build(layout: str, weight: torch.Tensor, keep: torch.Tensor, bias: Optional[torch.Tensor], values: str,
          backend: str, n: int = 0, m: int = 0, scales: Optional[torch.Tensor] = None) -> nn.Module:
    """The sparse module storing weight * keep. scales (int8 / int4 values only): the per-row
    grid the weights already sit on (SparseGPT's joint quantization), kept as they are instead of
    being measured again from the kept values."""
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; it cannot be ranked or stored sparse")
    values = stored_values(values, layout, weight.dtype)
    on_grid = scales is not None and values in CODED_VALUES
    store = "float32" if on_grid else values
    if layout == "nm":
        mod = NMSparseLinear.from_dense(weight, keep, n, m, store, bias, backend)
    else:
        mod = CSRSparseLinear.from_dense(weight, keep, store, bias, backend)
    if not on_grid:
        return mod
    # codes = the grid points the weights sit on (exact up to fp32 rounding of code * scale)
    qmax = CODE_MAX[VALUE_DTYPES[values]]
    codes = torch.round(mod.values / scales.to(mod.values)[_row_of(mod)]).clamp(-qmax, qmax).to(torch.int8)
    mod.values_dtype = values
    mod.values = codes if values == "int8" else pack_int4(codes)
    mod.scales = scales.float().clone().to(weight.device)
    return mod


def stored_values(values: str, layout: str, dtype: torch.dtype) -> str:
    """The values dtype a config's "auto" means for this weight: its own float dtype where the
    layout stores it (a half model sparsified in float32 would grow), else float32."""
    if values != "auto":
        return values
    own = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    return own if layout == "nm" else "float32"


def _row_of(mod: nn.Module) -> torch.Tensor:
    """Index of each stored value's row, in the values' shape."""
    if isinstance(mod, NMSparseLinear):
        return torch.arange(mod.out_features, device=mod.values.device)[:, None].expand_as(mod.values)
    counts = mod.row_ptr[1:] - mod.row_ptr[:-1]
    return torch.repeat_interleave(torch.arange(mod.out_features, device=mod.values.device), counts)
