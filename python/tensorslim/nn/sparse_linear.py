"""Sparse linears: only the kept weights are stored, and the kernel skips the zeros.

NMSparseLinear: n of every m weights per row (2:4, 1:4, 4:8): values plus in-group positions.
CSRSparseLinear: any pattern: values plus 16-bit column offsets per row.
Values are float32 (also bfloat16 / float16 for n:m) or int8 (also int4 for n:m, two codes per
byte) with a per-output-channel scale.
The formats are specified in docs/formats.md ("Sparse storage"); the kernels in
src/cpu/sparse/. Inputs of any float dtype are computed in float32 and returned in their dtype.
"""
from typing import Optional

import torch

from .compressed_linear import CompressedLinear
from .compute_dtype import stored_bias

VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
                "int4": torch.uint8}  # int4: two codes per byte (ops.sparse.INT4_VALUES)
CODED_VALUES = ("int8", "int4")  # stored as integer codes with one float32 scale per output channel


def _ops():
    from ..ops import sparse  # the ops package imports nn: load on first use

    return sparse


class _SparseLinear(CompressedLinear):
    action = "sparsified"
    kernel_buffers: tuple = ()  # the buffers the op takes after x, in its order

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        # A float32 CPU input goes straight to the op's direct call with the buffers read from
        # _buffers (nn.Module.__getattr__ costs ~2 us a tensor) and no cast, copy or reshape it
        # does not need: at 384 x 384 and one row these took ~3x the kernel's time.
        t = self.packed_tensors(*self.kernel_buffers)
        if t is not None and x.dtype is torch.float32 and x.is_cpu:
            x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            if x2.is_contiguous():
                y = self._direct(x2, t)
                if y is not None:
                    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        return self._run(x, self._linear)

    def _direct(self, x2: torch.Tensor, t) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _run(self, x: torch.Tensor, fn) -> torch.Tensor:
        shape = x.shape
        if x.device.type == "meta":  # shape inference only
            return x.new_empty(*shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        y = fn(x2)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.dense_weight()

    def density(self) -> float:
        return float((self.dense_weight() != 0).sum()) / max(1, self.in_features * self.out_features)

    def note(self) -> str:
        return f"{1 - self.density():.1%} zeros"


class NMSparseLinear(_SparseLinear):
    kind = "sparse_nm"
    kernel_buffers = ("values", "indices", "scales", "bias")

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, values: str = "float32",
                 bias: bool = True, backend: str = "auto", device=None):
        super().__init__()
        if values not in VALUE_DTYPES:
            raise ValueError(f"NMSparseLinear: values must be one of {sorted(VALUE_DTYPES)}, got {values!r}")
        if m not in (4, 8) or type(n) is not int or not 1 <= n < m:
            raise ValueError(f"NMSparseLinear: need m in (4, 8) and 1 <= n < m, got {n}:{m}")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        self.values_dtype, self.backend = values, backend
        vshape, ishape = _ops().nm_shapes(out_features, in_features, n, m, VALUE_DTYPES[values])
        self.register_buffer("values", torch.zeros(vshape, dtype=VALUE_DTYPES[values], device=device))
        self.register_buffer("indices", torch.zeros(ishape, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device) if values in CODED_VALUES else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, n: int, m: int, values: str = "float32",
                   bias: Optional[torch.Tensor] = None, backend: str = "auto") -> "NMSparseLinear":
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, n, m, values, bias is not None, backend, device=weight.device)
        v, idx, scales = _ops().nm_pack(weight.detach().float(), keep, n, m, VALUE_DTYPES[values])
        mod._fill(v, idx, scales, bias)
        return mod

    def _fill(self, values, indices, scales, bias) -> None:
        self.values.copy_(values)
        self.indices.copy_(indices)
        if scales is not None:
            self.scales.copy_(scales)
        if bias is not None:
            self.bias.copy_(bias.detach().float())

    def _direct(self, x2: torch.Tensor, t) -> Optional[torch.Tensor]:
        return _ops().nm_linear_direct(x2, *t, self.n, self.m, self.backend)

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        ops = _ops()
        t = (self.values, self.indices, self.scales, stored_bias(self))
        y = ops.nm_linear_direct(x2, *t, self.n, self.m, self.backend)
        return y if y is not None else ops.nm_linear(x2, *t, self.n, self.m, self.in_features, self.backend)

    def dense_weight(self) -> torch.Tensor:
        return _ops().nm_unpack(self.values, self.indices, self.scales, self.n, self.m, self.in_features)

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["in_features"], spec["out_features"], spec["n"], spec["m"], spec["values"], spec["bias"],
                   device=device)

    def spec(self) -> dict:
        return {"kind": self.kind, "format": f"{self.n}:{self.m}", "n": self.n, "m": self.m,
                "values": self.values_dtype, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def describe(self) -> str:
        return f"{self.n}:{self.m} {self.values_dtype}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}, "
                f"values={self.values_dtype}, bias={self.bias is not None}")


class CSRSparseLinear(_SparseLinear):
    kind = "sparse_csr"
    kernel_buffers = ("values", "cols", "row_ptr", "scales", "bias")

    def __init__(self, in_features: int, out_features: int, nnz: int, values: str = "float32", bias: bool = True,
                 backend: str = "auto", device=None):
        super().__init__()
        if values not in ("float32", "int8"):
            raise ValueError(f"CSRSparseLinear: values must be 'float32' or 'int8', got {values!r}")
        if in_features > 65536:
            raise ValueError(f"CSRSparseLinear: in_features {in_features} > 65536 does not fit 16-bit column offsets")
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.values_dtype, self.backend = values, backend
        self.register_buffer("values", torch.zeros(nnz, dtype=VALUE_DTYPES[values], device=device))
        self.register_buffer("cols", torch.zeros(nnz, dtype=torch.uint16, device=device))
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int64, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device) if values == "int8" else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, values: str = "float32",
                   bias: Optional[torch.Tensor] = None, backend: str = "auto") -> "CSRSparseLinear":
        out_features, in_features = weight.shape
        v, cols, row_ptr, scales = _ops().csr_pack(weight.detach().float(), keep, VALUE_DTYPES[values])
        mod = cls(in_features, out_features, v.numel(), values, bias is not None, backend, device=weight.device)
        mod.values.copy_(v)
        mod.cols.copy_(cols)
        mod.row_ptr.copy_(row_ptr)
        if scales is not None:
            mod.scales.copy_(scales)
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        return mod

    def __getstate__(self):
        # pickle.dumps writes a uint16 tensor that pickle.loads cannot read back (torch 2.13: its
        # storage has no dtype), so the columns travel as the int16 view of the same bits
        state = dict(super().__getstate__())
        cols = state["_buffers"].get("cols")
        if cols is not None and cols.dtype == torch.uint16:
            state["_buffers"] = {**state["_buffers"], "cols": cols.view(torch.int16)}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        cols = self._buffers.get("cols")
        if cols is not None and cols.dtype == torch.int16:
            self._buffers["cols"] = cols.view(torch.uint16)

    def _direct(self, x2: torch.Tensor, t) -> Optional[torch.Tensor]:
        return _ops().csr_linear_direct(x2, *t, self.backend)

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        ops = _ops()
        t = (self.values, self.cols, self.row_ptr, self.scales, stored_bias(self))
        y = ops.csr_linear_direct(x2, *t, self.backend)
        return y if y is not None else ops.csr_linear(x2, *t, self.in_features, self.backend)

    def dense_weight(self) -> torch.Tensor:
        return _ops().csr_unpack(self.values, self.cols, self.row_ptr, self.scales, self.in_features)

    def density(self) -> float:
        return self.nnz / max(1, self.in_features * self.out_features)

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["in_features"], spec["out_features"], spec["nnz"], spec["values"], spec["bias"],
                   device=device)

    def spec(self) -> dict:
        return {"kind": self.kind, "format": "csr", "nnz": self.nnz,
                "values": self.values_dtype, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def describe(self) -> str:
        return f"csr {self.values_dtype}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"values={self.values_dtype}, bias={self.bias is not None}")
