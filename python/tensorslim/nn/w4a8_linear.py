"""nn.Linear with INT4 weights and INT8 activations quantized per token at run time (W4A8),
run by an integer kernel (AVX-512 VNNI on the CPU)."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from .._identity import tensor_identity
from ..formats import get_format
from ..ops.w4a8 import W4A8_BACKENDS, W4A8_FORMATS, check_group_size
from .packed_linear import PackedLinear
from .weight_only_linear import fill_from_linear


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
        self._packed = None  # pack_w4a8_weight's copy: derived, never saved
        self._packed_key = None

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

    def packed_weight(self, qweight: torch.Tensor, scales: torch.Tensor,
                      zero_points: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """pack_w4a8_weight of these tensors, made again when one of them changes (load_state_dict,
        to(), in place); None where no kernel reads such a copy (reference or scalar backend, not
        on the CPU, no native kernel under the active ISA, a traced graph)."""
        if (self.backend in ("reference", "scalar") or qweight.device.type != "cpu"
                or torch.compiler.is_compiling() or not ops.w4a8.packing_pays()):
            return None
        key = (tensor_identity(qweight), tensor_identity(scales), tensor_identity(zero_points))
        if key != self._packed_key:
            self._packed = None  # the old copy goes before the new one is made
            self._packed = ops.w4a8.pack_w4a8_weight(qweight, scales, zero_points, self.fmt,
                                                     self.group_size, self.in_features)
            self._packed_key = key
        return self._packed

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.packed_tensors("qweight", "scales", "zero_points", "bias")
        if t is None:
            t = [self.qweight, self.scales, self.zero_points, self.bias]
            return ops.linear_w4a8(x, *t, self.fmt, self.group_size, self.in_features, self.backend,
                                   self.packed_weight(*t[:3]))
        packed = self.packed_weight(*t[:3])
        y = ops.w4a8.linear_w4a8_direct(x, *t, self.fmt, self.group_size, self.in_features, self.backend, packed)
        if y is not None:
            return y
        return ops.linear_w4a8(x, *t, self.fmt, self.group_size, self.in_features, self.backend, packed)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_lowbit(self.qweight, self.scales, self.zero_points, None, self.fmt,
                                     self.group_size, self.in_features, dtype)

    def describe(self) -> str:
        """As summaries print it, e.g. 'w4a8 int4 g128' (activations: int8 per token)."""
        return f"w4a8 {super().describe()}"
