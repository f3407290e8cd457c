"""nn.Linear with INT8 weights and INT8 activations (W8A8), run by a real INT8 GEMM.

Static mode: one calibrated activation scale (and uint8 zero point) per layer.
Dynamic mode: one scale per token, computed at run time.
SmoothQuant's factors s are either folded into the preceding layer (then the module just
sees smoothed inputs) or kept here as `inv_smooth` = 1/s, fused into activation quantization.
"""
from typing import Optional

import torch

from .. import _views, ops
from .._native import _C
from .._identity import tensor_identity
from ..ops import _eager, torch_onednn
from .compressed_linear import CompressedLinear
from .compute_dtype import stored_bias

MODES = ("static", "dynamic")


class Int8Linear(CompressedLinear):
    """y = dequant(quant(x * inv_smooth) @ qweight.T) + bias.

    Buffers (the whole state): qweight int8 [out, in], w_scales fp32 [out] (symmetric, per
    output channel), bias fp32 [out] (if the layer had one), inv_smooth fp32 [in] (only
    when smoothing is applied here), act_scale fp32 [1] and act_zero_point int32 [1]
    (static mode only).
    """

    kind = "int8_linear"

    def __init__(self, in_features: int, out_features: int, mode: str = "static", bias: bool = True,
                 has_inv_smooth: bool = False, act_signed: bool = False, smooth: str = "none",
                 backend: str = "auto", device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear: mode must be one of {MODES}, got {mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.act_signed, self.smooth, self.backend = mode, act_signed, smooth, backend
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scales", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("inv_smooth", torch.ones(in_features, device=device) if has_inv_smooth else None)
        static = mode == "static"
        self.register_buffer("act_scale", torch.ones(1, device=device) if static else None)
        self.register_buffer("act_zero_point",
                             torch.zeros(1, dtype=torch.int32, device=device) if static else None)
        self.forget_derived()

    def forget_derived(self) -> None:
        self._packed = None  # qweight in oneDNN's blocked layout: derived, never saved
        self._packed_key = None
        self._torch_packed = torch_onednn.PackedCache()  # qweight identity -> packed for torch's matmul
        self._call_plans = torch_onednn.PackedCache()  # tensor identities -> native call arguments
        self._narrow_key, self._narrow = None, False  # qweight identity -> codes all in [-64, 64]

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
                   inv_smooth: Optional[torch.Tensor] = None, act_scale: Optional[float] = None,
                   act_zero_point: int = 0, act_signed: bool = False, smooth: str = "none",
                   backend: str = "auto", weight_qmax: int = 127) -> "Int8Linear":
        """Quantize a (possibly already smoothed) float weight [out, in] per output channel,
        codes in [-weight_qmax, weight_qmax] (see the configs' weight_qmax)."""
        out_features, in_features = weight.shape
        if mode == "static" and act_scale is None:
            raise ValueError("static W8A8 needs a calibrated act_scale")
        mod = cls(in_features, out_features, mode, bias is not None, inv_smooth is not None, act_signed,
                  smooth, backend, device=weight.device)
        with torch.no_grad():
            q, scales = ops.int8.weight_codes(weight.detach().float().contiguous(), weight_qmax)
            mod.qweight.copy_(q)
            mod.w_scales.copy_(scales.reshape(-1))
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
            if inv_smooth is not None:
                mod.inv_smooth.copy_(inv_smooth.float())
            if mode == "static":
                mod.act_scale.fill_(float(act_scale))
                mod.act_zero_point.fill_(int(act_zero_point))
        return mod

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "Int8Linear":
        """An empty module of the shape a saved file describes (see io.load)."""
        return cls(spec["in_features"], spec["out_features"], spec["mode"], spec["bias"],
                   spec["inv_smooth"], spec["act_signed"], spec["smooth"], device=device)

    def spec(self) -> dict:
        return {"kind": self.kind, "format": "w8a8" if self.mode == "static" else "int8_dynamic",
                "mode": self.mode, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "inv_smooth": self.inv_smooth is not None,
                "act_signed": self.act_signed, "smooth": self.smooth}

    def packed_weight(self, qweight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """qweight packed for the GEMM, rebuilt when qweight changes (load_state_dict, to());
        None where the GEMM runs on the plain weight (ops.int8.packing_pays)."""
        qweight = self.qweight if qweight is None else qweight
        if torch.compiler.is_compiling():  # a traced graph reads the plain weight (no native query, no cache)
            return None
        if self.backend == "reference" or qweight.device.type != "cpu" or not ops.int8.packing_pays():
            self._packed = self._packed_key = None  # a copy packed under another ISA setting is dead weight
            return None
        key = (tensor_identity(qweight), _C.kernel_isa())  # the layout follows the ISA (and AVX2's VNNI)
        if key != self._packed_key:
            with _eager.untraced():
                self._packed = ops.int8.pack_int8_weight(qweight)
            self._packed_key = key
        return self._packed

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.packed_tensors("qweight", "w_scales", "bias", "inv_smooth", "act_scale", "act_zero_point")
        if t is None:
            t = [self.qweight, self.w_scales, stored_bias(self), self.inv_smooth, self.act_scale,
                 self.act_zero_point]
        qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point = t
        eager = _eager.direct_ok((x, qweight, w_scales, bias, inv_smooth))  # first: no probe while compiling
        if (eager and self.backend == "auto" and not self.act_signed
                and torch_onednn.linear_pays(x.numel() // self.in_features, self.in_features, self.out_features)):
            return self._torch_forward(x, qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point)
        if eager and self.backend != "reference" and (act_scale is None or act_scale.is_cpu):
            plan = self._call_plan(qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point)
            x2 = x.reshape(-1, self.in_features)
            if x2.dtype is not torch.float32:
                x2 = x2.to(torch.float32)
            y = torch.empty(x2.shape[0], self.out_features)
            _C.linear_w8a8(_views.view(x2.contiguous(), "x"), *plan[0], _views.view(y, "out"), *plan[1])
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if x.dtype is torch.float32 else y.to(x.dtype)
        packed = self.packed_weight(qweight)
        if self.mode == "static":  # scale and zero point stay tensors: traced graphs read no host value
            x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
            y = ops.int8.linear_w8a8_static(x2, qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point,
                                            self.act_signed, self.backend, packed)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return ops.linear_w8a8(x, qweight, w_scales, bias, inv_smooth, backend=self.backend, packed=packed)

    def _call_plan(self, qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point) -> tuple:
        """The native call's arguments around x and out (ops.linear_w8a8's eager call: views,
        backend, packed weight, the static scale and zero point checked and read once), cached
        while these tensors are the same objects, unmodified: a call then pays no scalar reads,
        checks or packing lookups (at MiniLM's 384 x 384 with 18 tokens those were half the
        call)."""
        tensors = (qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point)
        key = (*(tensor_identity(t) for t in tensors), _C.kernel_isa())  # the packed layout follows the ISA
        plan = self._call_plans.get(key)
        if plan is None:
            static = self.mode == "static"
            plan = ops.int8.w8a8_call_args(inv_smooth, qweight, w_scales, bias, self.backend,
                                           self.packed_weight(qweight), float(act_scale) if static else None,
                                           int(act_zero_point) if static else 0,
                                           torch.int8 if self.act_signed else torch.uint8)
            self._call_plans.clear()  # one set of tensors at a time: stale views would keep old weights alive
            self._call_plans[key] = plan
        return plan

    def _narrow_weights(self, qweight: torch.Tensor) -> bool:
        """Whether every weight code lies in [-64, 64] (weight_qmax=64), found once per weight."""
        key = tensor_identity(qweight)
        if key != self._narrow_key:
            self._narrow, self._narrow_key = ops.int8.codes_within_64(qweight), key
        return self._narrow

    def _torch_forward(self, x, qweight, w_scales, bias, inv_smooth, act_scale, act_zero_point) -> torch.Tensor:
        """The product on torch's oneDNN matmul (ops/torch_onednn.py), for the row counts and
        shapes where that was measured faster (torch_onednn.linear_pays)."""
        key = tensor_identity(qweight)
        packed = self._torch_packed.get(key)
        if packed is None:  # new weights (load_state_dict, to(), changed in place): repack
            self._torch_packed = torch_onednn.PackedCache()
            packed = self._torch_packed[key] = torch_onednn.linear_prepack(qweight)
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        static = self.mode == "static"
        y = torch_onednn.linear_w8a8(x2, packed, w_scales, bias, inv_smooth,
                                     float(act_scale) if static else None, int(act_zero_point) if static else 0)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float weight, smoothing undone: W ≈ dequant(qweight) * inv_smooth."""
        w = self.qweight.float() * self.w_scales[:, None]
        return w * self.inv_smooth[None, :] if self.inv_smooth is not None else w

    def describe(self) -> str:
        """As summaries print it, e.g. 'w8a8 u8 smooth:input' or 'int8 dyn/token smooth:none w±64'
        (weight codes in [-64, 64], the configs' weight_qmax)."""
        if self.mode == "static":
            head = f"w8a8 {'s8' if self.act_signed else 'u8'}"
        else:
            head = "int8 dyn/token"
        narrow = self.qweight.device.type == "cpu" and self._narrow_weights(self.qweight)
        return f"{head} smooth:{self.smooth}" + (" w±64" if narrow else "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bias={self.bias is not None}, smooth={self.smooth}")
