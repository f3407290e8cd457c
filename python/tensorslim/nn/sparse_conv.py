"""Sparse convolutions: an nn.Conv2d / nn.Conv1d (zero padding, any groups) whose weight, viewed
as the [out_channels, in_channels / groups * kernel elements] matrix torch's im2col order
gives, is stored as the sparse linears store theirs (NMSparseConv2d / NMSparseConv1d: n of every m;
CSRSparseConv2d / CSRSparseConv1d: any pattern), and runs the sparse kernels on per-image input
planes (ops/sparse_conv.py, docs/formats.md "Sparse convolutions"; a Conv1d is the Conv2d of
height 1). The conv's surface: in_channels, out_channels, kernel_size, stride, padding,
dilation, groups, padding_mode, a read-only `.weight` [out, in, *kernel_size] (the dense
weight, rebuilt on each access) and `.bias`.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .compute_dtype import COMPUTE_DTYPES, stored_bias
from .int8_conv import float_geometry
from .sparse_linear import CSRSparseLinear, NMSparseLinear


def _sparse_conv_ops():
    from ..ops import sparse_conv  # the ops package imports nn: load on first use

    return sparse_conv


def conv_supported(conv: nn.Module) -> Optional[str]:
    """Why `conv` cannot become a sparse conv, or None."""
    if type(conv) not in (nn.Conv1d, nn.Conv2d):
        return f"{type(conv).__name__}: only nn.Conv1d and nn.Conv2d have sparse kernels"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: sparse convolutions pad with zeros"
    try:
        float_geometry(conv)
    except ValueError as e:
        return str(e)
    return None


class _SparseConv:
    """What the sparse convs add to their linear storage (mixed in before it)."""

    kind = ""
    float_type = nn.Conv2d
    padding_mode = "zeros"

    def _set_geometry(self, geometry: dict) -> None:
        self.geometry = dict(geometry)
        self.in_channels, self.out_channels = geometry["in_channels"], geometry["out_channels"]
        self.groups = geometry.get("groups", 1)
        for f in ("kernel_size", "stride", "padding", "dilation"):
            setattr(self, f, tuple(geometry[f]))

    @staticmethod
    def _linear_shape(geometry: dict):
        columns = geometry["in_channels"] // geometry.get("groups", 1) * math.prod(geometry["kernel_size"])
        return columns, geometry["out_channels"]

    @classmethod
    def _from(cls, conv: nn.Module, linear) -> "_SparseConv":
        """The conv module holding `linear`'s packed buffers (made from conv's weight matrix)."""
        mod = cls.from_spec({**linear.spec(), "geometry": float_geometry(conv)}, device="meta")
        mod.backend = linear.backend
        mod._buffers.update(linear._buffers)
        return mod

    def kernel_geometry(self) -> tuple:
        """(kh, kw, sh, sw, ph, pw, dh, dw, groups) for the ops (a Conv1d: height 1)."""
        if len(self.kernel_size) == 1:
            return (1, *self.kernel_size, 1, *self.stride, 0, *self.padding, 1, *self.dilation, self.groups)
        return (*self.kernel_size, *self.stride, *self.padding, *self.dilation, self.groups)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in / groups, *kernel_size] weight (a fresh tensor; read-only)."""
        w = self.dense_weight().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return w.to(self.compute_dtype)

    def dense_bytes(self) -> int:
        return 4 * self.out_channels * (self.in_features + (1 if self.bias is not None else 0))

    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        """Whether `mod` is the float conv a saved spec was made from (io.load)."""
        if type(mod) is not cls.float_type or conv_supported(mod) is not None:
            return False
        def shape(g):
            return {k: v for k, v in g.items() if k != "bias"}
        return shape(float_geometry(mod)) == shape(spec["geometry"])

    def check_input(self, x) -> None:
        kind = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{kind}: expected a torch.Tensor input, got {type(x).__name__}")
        dims = len(self.kernel_size)
        if x.dim() not in (dims + 1, dims + 2) or x.shape[-dims - 1] != self.in_channels:
            spatial = ", ".join("HW"[2 - dims:]) if dims == 2 else "L"
            raise ValueError(f"{kind}: expected an input [B, {self.in_channels}, {spatial}] or "
                             f"[{self.in_channels}, {spatial}], got shape {tuple(x.shape)}")
        if x.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"{kind}: expected a float input (float32, bfloat16 or float16), got {x.dtype}")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # CompressedLinear.forward calls it
        self.check_input(x)
        dtype = self._compute_dtype or x.dtype
        dims = len(self.kernel_size)
        unbatched = x.dim() == dims + 1
        batched = x.unsqueeze(0) if unbatched else x
        if dims == 1:  # the conv of height 1
            batched = batched.unsqueeze(2)
        bias = self._buffers.get("bias")
        if x.device.type == "meta":
            y = batched.new_empty(_sparse_conv_ops().output_shape(batched.shape, self.out_channels,
                                                                   self.kernel_geometry()))
        elif (x.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled():
            # gradients flow through the dense weight (the stored one is frozen, as the
            # compressed linears' is)
            kh, kw, sh, sw, ph, pw, dh, dw, groups = self.kernel_geometry()
            w = self.dense_weight().detach().reshape(self.out_channels, self.in_channels // groups, kh, kw)
            y = F.conv2d(batched.float(), w, None if bias is None else bias.float(), (sh, sw), (ph, pw), (dh, dw),
                         groups)
        else:
            y = self._sparse_conv(batched.float().contiguous())
        y = y.to(dtype)
        if dims == 1:
            y = y.squeeze(2)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}{groups}, {self.describe()}, "
                f"bias={self.bias is not None}")


class NMSparseConv2d(_SparseConv, NMSparseLinear):
    kind = "sparse_nm_conv2d"

    def __init__(self, geometry: dict, n: int = 2, m: int = 4, values: str = "float32", backend: str = "auto",
                 device=None):
        NMSparseLinear.__init__(self, *self._linear_shape(geometry), n, m, values, geometry["bias"], backend,
                                device=device)
        self._set_geometry(geometry)

    @classmethod
    def from_conv(cls, conv: nn.Module, keep: torch.Tensor, n: int, m: int, values: str = "float32",
                  backend: str = "auto") -> "NMSparseConv2d":
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        bias = conv.bias.detach() if conv.bias is not None else None
        return cls._from(conv, NMSparseLinear.from_dense(w, keep.reshape(w.shape), n, m, values, bias, backend))

    def _sparse_conv(self, x: torch.Tensor) -> torch.Tensor:
        ops = _sparse_conv_ops()
        t = (self.values, self.indices, self.scales, stored_bias(self))
        y = ops.nm_conv2d_direct(x, *t, self.n, self.m, self.kernel_geometry(), self.backend)
        return y if y is not None else ops.nm_conv2d(x, *t, self.n, self.m, self.in_channels, self.kernel_geometry(),
                                                     self.backend)

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["geometry"], spec["n"], spec["m"], spec["values"], device=device)

    def spec(self) -> dict:
        return {**NMSparseLinear.spec(self), "kind": self.kind, "geometry": self.geometry}


class CSRSparseConv2d(_SparseConv, CSRSparseLinear):
    kind = "sparse_csr_conv2d"

    def __init__(self, geometry: dict, nnz: int, values: str = "float32", backend: str = "auto", device=None):
        CSRSparseLinear.__init__(self, *self._linear_shape(geometry), nnz, values, geometry["bias"], backend,
                                 device=device)
        self._set_geometry(geometry)

    @classmethod
    def from_conv(cls, conv: nn.Module, keep: torch.Tensor, values: str = "float32",
                  backend: str = "auto") -> "CSRSparseConv2d":
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        bias = conv.bias.detach() if conv.bias is not None else None
        return cls._from(conv, CSRSparseLinear.from_dense(w, keep.reshape(w.shape), values, bias, backend))

    def _sparse_conv(self, x: torch.Tensor) -> torch.Tensor:
        ops = _sparse_conv_ops()
        t = (self.values, self.cols, self.row_ptr, self.scales, stored_bias(self))
        y = ops.csr_conv2d_direct(x, *t, self.kernel_geometry(), self.backend)
        return y if y is not None else ops.csr_conv2d(x, *t, self.in_channels, self.kernel_geometry(), self.backend)

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["geometry"], spec["nnz"], spec["values"], device=device)

    def spec(self) -> dict:
        return {**CSRSparseLinear.spec(self), "kind": self.kind, "geometry": self.geometry}


class NMSparseConv1d(NMSparseConv2d):
    kind = "sparse_nm_conv1d"
    float_type = nn.Conv1d


class CSRSparseConv1d(CSRSparseConv2d):
    kind = "sparse_csr_conv1d"
    float_type = nn.Conv1d
