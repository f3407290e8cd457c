"""nn.Linear with INT4 weights and INT8 activations quantized per token at run time (W4A8),
run by an integer kernel (AVX-512 VNNI on the CPU)."""
from typing import Optional

import torch
from torch import nn

from .. import _views, ops
from .._identity import tensor_identity
from .._native import _C
from ..formats import get_format
from ..ops import _eager
from ..ops.torch_onednn import PackedCache
from ..ops.w4a8 import W4A8_BACKENDS, W4A8_FORMATS, check_group_size
from .packed_linear import PackedLinear
from .weight_only_linear import fill_from_linear
from .compute_dtype import held_bias, stored_bias


class W4A8Linear(PackedLinear):
    """y = quant8(x) @ dequantize(qweight).T + bias with integer group dot products.

    Buffers (the whole state): qweight uint8 [out, ceil(in / 2)] (int4 / uint4 codes, two per
    byte, low nibble first), scales fp32 [out, ceil(in / group)] (the last group short when group
    does not divide in), zero_points uint8 (uint4 only),
    bias fp32 (if the layer had one). The activation scales are computed per token at run time.

    The first call on a native kernel makes a copy of the weights laid out for it
    (ops.w4a8.pack_w4a8_weight: 16 rows side by side per 64 bytes, scales per panel; the size
    of qweight and scales again, derived, never saved), which every call reads from then on:
    4096 x 4096 with the weights in cache 1.6-1.7x faster at 1-2 tokens, ~2x at 4, 1.1-1.2x at
    32-128 (docs/w8a8.md, "The layer's packed copy").
    """

    kind = "w4a8_linear"

    def __init__(self, in_features: int, out_features: int, fmt: str = "int4", group_size: int = 128,
                 bias: bool = True, backend: str = "auto", device=None):
        super().__init__()
        if fmt not in W4A8_FORMATS:
            raise ValueError(f"W4A8Linear: format must be one of {W4A8_FORMATS}, got {fmt!r}")
        groups = check_group_size(in_features, group_size)
        if backend != "reference" and backend not in W4A8_BACKENDS:
            raise ValueError(f"W4A8Linear: backend must be one of "
                             f"{sorted(W4A8_BACKENDS) + ['reference']}, got {backend!r}")
        spec = get_format(fmt)
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.backend = fmt, group_size, backend
        self._register_packed(spec, in_features, out_features, groups, bias, device)
        self.forget_derived()

    def forget_derived(self) -> None:
        # tensor identities -> (pack_w4a8_weight's copy, the native call's arguments around x and
        # out): derived, never saved, not copied with the module
        self._plans = PackedCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int4", group_size: Optional[int] = 128,
                    backend: str = "auto") -> "W4A8Linear":
        """Quantize a trained nn.Linear's weight (round to nearest); group_size None means one
        scale per output channel."""
        group = group_size or linear.in_features
        mod = cls(linear.in_features, linear.out_features, fmt, group, linear.bias is not None,
                  backend, device=linear.weight.device)
        # The low-bit table's int4 / uint4 rows: the bytes ops.quantize writes, and a short last
        # group when group does not divide in_features.
        return fill_from_linear(mod, linear, lambda w, f, g: ops.quantize_lowbit(w, f, g)[:3])

    def _packs(self, qweight: torch.Tensor) -> bool:
        """Whether a native kernel would read a packed copy (not the reference or scalar backend,
        on the CPU, a native kernel under the active ISA, not a traced graph)."""
        return (self.backend not in ("reference", "scalar") and qweight.is_cpu
                and not torch.compiler.is_compiling() and ops.w4a8.packing_pays())

    def packed_weight(self, qweight: torch.Tensor, scales: torch.Tensor,
                      zero_points: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """pack_w4a8_weight of these tensors, made again when one of them changes (load_state_dict,
        to(), in place); None where no kernel reads such a copy (see _packs) or the shape has none."""
        if not self._packs(qweight):
            return None
        return self._call_plan(qweight, scales, zero_points, stored_bias(self))[0]

    def _call_plan(self, qweight, scales, zero_points, bias) -> tuple:
        """(packed copy, native call arguments) for these tensors, cached while they are the same
        and unmodified: a call then pays no views, format lookups or packing checks (at 384 x 384
        and 1 token ~3 of the call's ~20 us)."""
        # the bias as stored: a half one set by the user reaches here as a new float32 copy per call
        key = tuple(tensor_identity(t) for t in (qweight, scales, zero_points, held_bias(self)))
        plan = self._plans.get(key)
        if plan is None:
            self._plans.clear()  # one set of tensors at a time: the old copy goes before the new one
            with _eager.untraced():
                packed = ops.w4a8.pack_w4a8_weight(qweight, scales, zero_points, self.fmt, self.group_size,
                                                   self.in_features)
            plan = (packed,
                    (_views.view(qweight, "qweight"), _views.view(scales, "scales"),
                     _views.optional_view(zero_points, "zero_points"), _views.optional_view(bias, "bias"),
                     get_format(self.fmt).id, self.group_size),
                    (ops.w4a8.W4A8_BACKENDS[self.backend], _views.optional_view(packed, "packed")))
            self._plans[key] = plan
        return plan

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.packed_tensors("qweight", "scales", "zero_points", "bias")
        if t is None:  # a buffer re-set as a parameter: the op with all its checks
            t = [self.qweight, self.scales, self.zero_points, stored_bias(self)]
            return ops.linear_w4a8(x, *t, self.fmt, self.group_size, self.in_features, self.backend,
                                   self.packed_weight(*t[:3]))
        packed = None
        if self._packs(t[0]):
            packed, weights, tail = self._call_plan(*t)
            if packed is not None and x.dtype is torch.float32 and _eager.direct_ok((x, *t)):
                # The op's CPU function with the same arguments, the weights' part prepared once.
                x2 = x.reshape(-1, self.in_features)
                if x2.stride(-1) == 1:
                    y = torch.empty(x2.shape[0], self.out_features)
                    _C.linear_w4a8(_views.view(x2, "x"), *weights, _views.view(y, "out"), *tail)
                    return y.reshape(*x.shape[:-1], self.out_features)
        return ops.linear_w4a8(x, *t, self.fmt, self.group_size, self.in_features, self.backend, packed)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_lowbit(self.qweight, self.scales, self.zero_points, None, self.fmt,
                                     self.group_size, self.in_features, dtype)

    def describe(self) -> str:
        """As summaries print it, e.g. 'w4a8 int4 g128' (activations: int8 per token)."""
        return f"w4a8 {super().describe()}"
