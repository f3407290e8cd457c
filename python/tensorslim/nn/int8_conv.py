"""nn.Conv1d / nn.Conv2d with INT8 weights (per output channel) and INT8 activations, run by
oneDNN's int8 convolution (ops/conv_int8.py).

static:  one calibrated activation scale and uint8 zero point (W8A8).
dynamic: the scale and zero point of each call's input range (Int8Dynamic; of the positions
         the conv reads: a strided 1 x 1 conv takes every stride-th one first).
oneDNN's kernel and its reordered weights are picked once per input shape and kept in the
module. Where that kernel lacks VNNI/AMX (AVX2 CPUs) it sums pairs of u8 x s8 products in
saturating int16, so activations are then quantized to 7 bits ([0, 127], the "reduce range"
fbgemm uses): a pair is at most 2 * 127 * 127 < 32767 and the result stays exact.
"""
import math
from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import _views, ops
from .._identity import tensor_identity
from .._native import _C
from ..ops import _eager
from ..ops import conv_int8 as conv_ops
from ..ops import torch_onednn
from .compressed_linear import needs_function, owned_output, trainable_bias
from .lazy_weight import lazy_weight
from .compute_dtype import COMPUTE_DTYPES, BiasInComputeDtype, keeping_dtypes, stored_bias, target_dtype
from .layer_errors import note_layer

MODES = ("static", "dynamic")
_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
_MAX_SHAPES = 16  # packed weights kept per module (one per input shape seen)


def float_geometry(conv: nn.Module) -> dict:
    """What an Int8Conv must reproduce of the float conv (JSON-friendly); padding as ints."""
    g = {f: getattr(conv, f) for f in _GEOMETRY}
    for f in ("kernel_size", "stride", "dilation"):
        g[f] = list(g[f])
    g["padding"] = list(symmetric_padding(conv))
    g["bias"] = conv.bias is not None
    return g


def symmetric_padding(conv: nn.Module) -> Tuple[int, ...]:
    """The conv's padding as one int per spatial dim; a ValueError where it is not symmetric."""
    p = conv.padding
    if p == "valid":
        return (0,) * len(conv.kernel_size)
    if p == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even kernel pads one side more than the other")
        return tuple(t // 2 for t in total)
    return tuple(p)


class _FrozenConvFunction(torch.autograd.Function):
    """Forward: the int8 kernel; backward: the input gradient through the dequantized weight
    (activation rounding passed straight through, as for the compressed linears), and grad_y
    summed per channel to a bias made trainable; forward mode: the same convolution of the
    tangents. torch.func's transforms take it as they take the compressed linears'."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, bias, layer):
        return owned_output(layer.kernel_forward(x))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, layer = inputs
        ctx.layer, ctx.shape, ctx.x_dtype = layer, x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.out_strides = output.stride()  # channels last: the tangent must be laid out alike

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        m, grad_x, grad_bias = ctx.layer, None, None
        if ctx.needs_input_grad[0]:
            grad = nn.grad.conv1d_input if m.sp == 1 else nn.grad.conv2d_input
            gx = grad(ctx.shape, m.weight, grad_y.float(), m.stride, m.padding, m.dilation, m.groups)
            grad_x = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.float().sum([d for d in range(grad_y.dim()) if d != 1]).to(ctx.bias_dtype)
        return grad_x, grad_bias, None

    @staticmethod
    def jvp(ctx, x_t, bias_t, _):
        m = ctx.layer
        if x_t is None:  # a tangent on the bias alone
            x_t = torch.zeros(ctx.shape)
        conv = F.conv1d if m.sp == 1 else F.conv2d
        out_t = conv(x_t.float(), m.weight, None, m.stride, m.padding, m.dilation, m.groups)
        if bias_t is not None:
            out_t = out_t + bias_t.float().reshape((-1,) + (1,) * m.sp)
        laid_out = torch.empty_strided(out_t.shape, ctx.out_strides, dtype=ctx.x_dtype, device=out_t.device)
        return laid_out.copy_(out_t)


class _Int8ConvNd(nn.Module):
    """y = conv(quant(x), qweight) * act_scale * w_scales[oc] + bias[oc].

    Buffers (the whole state): qweight int8 [out, in / groups, *kernel], w_scales fp32 [out]
    (symmetric, per output channel), bias fp32 [out] (the conv's, or a folded BatchNorm's),
    act_scale fp32 [1] and act_zero_point int32 [1] (static mode only).
    """

    kind = ""
    sp = 0
    float_type = nn.Conv2d

    def __init__(self, geometry: dict, mode: str = "static", bias: bool = True, folded: str = "",
                 backend: str = "auto", device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {MODES}, got {mode!r}")
        if backend not in ("auto", "reference"):
            raise ValueError(f"{type(self).__name__}: backend must be 'auto' or 'reference', got {backend!r}")
        self.geometry = dict(geometry)
        for f in _GEOMETRY:
            v = geometry[f]
            setattr(self, f, tuple(v) if isinstance(v, list) else v)
        self.mode, self.folded, self.backend = mode, folded, backend
        # A 1 x 1 conv without padding reads only every stride-th input position: those are
        # taken first and run through a stride-1 conv (the same result, a stride-th of the
        # input quantized; the digits ResNet shortcut, 2 x 2, batch 32: 1.2-1.3x per call).
        pointwise = all(k == 1 for k in self.kernel_size) and all(p == 0 for p in self.padding)
        self._pick = ((slice(None),) + tuple(slice(None, None, s) for s in self.stride)
                      if pointwise and any(s > 1 for s in self.stride) else None)
        self._run_stride = tuple(1 for _ in self.stride) if self._pick else tuple(self.stride)
        self.epilogue = ""  # what the parent's fused forward hands this conv (conv_epilogue.py)
        oc, k = self.out_channels, list(self.kernel_size)
        self.register_buffer("qweight", torch.zeros(oc, self.in_channels // self.groups, *k, dtype=torch.int8,
                                                    device=device))
        self.register_buffer("w_scales", torch.ones(oc, device=device))
        self.register_buffer("bias", torch.zeros(oc, device=device) if bias else None)
        static = mode == "static"
        self.register_buffer("act_scale", torch.ones(1, device=device) if static else None)
        self.register_buffer("act_zero_point", torch.zeros(1, dtype=torch.int32, device=device) if static else None)
        self.forget_derived()

    def forget_derived(self) -> None:
        """Drops what the layer derived from its buffers (as CompressedLinear.forget_derived:
        loading a state dict calls it)."""
        self._kernels: Dict[tuple, tuple] = {}  # (input shape, zero point != 0) -> (packed or None, 7-bit)
        self._kernels_key = None
        self._torch_kernels = torch_onednn.PackedCache()  # the same keys -> qweight packed for torch's kernel
        # static mode: (input shape, route on, tensor identities) -> call arguments
        self._plans: Dict[tuple, tuple] = torch_onednn.PackedCache()
        # forward's _signature of calls the static plan ran after every check (_checked_call)
        self._checked: Set[tuple] = set()
        self._pays_by_shape: Dict[torch.Size, bool] = {}  # input shape -> input_pays

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.forget_derived()

    # ------------------------------------------------------------ construction / io

    @classmethod
    def from_float(cls, conv: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
                   act_scale: Optional[float] = None, act_zero_point: int = 0, folded: str = "",
                   backend: str = "auto"):
        """Quantize `weight` (the conv's, or with a BatchNorm folded in) per output channel."""
        if mode == "static" and act_scale is None:
            raise ValueError("static W8A8 needs a calibrated act_scale")
        mod = cls(float_geometry(conv), mode, bias is not None, folded, backend, device=weight.device)
        with torch.no_grad():
            w = weight.detach().float()
            q, scales, _ = ops.quantize(w.reshape(w.shape[0], -1).contiguous(), "int8", w[0].numel())
            mod.qweight.copy_(q.reshape(w.shape))
            mod.w_scales.copy_(scales.reshape(-1))
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
            if mode == "static":
                mod.act_scale.fill_(float(act_scale))
                mod.act_zero_point.fill_(int(act_zero_point))
        return mod

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["geometry"], spec["mode"], spec["bias"], spec.get("folded", ""), device=device)

    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        """Whether `mod` is the float conv a saved spec was made from (io.load)."""
        if type(mod) is not cls.float_type:
            return False
        try:
            return float_geometry(mod) == spec["geometry"]
        except ValueError:
            return False

    def spec(self) -> dict:
        return {"kind": self.kind, "format": "w8a8" if self.mode == "static" else "int8_dynamic",
                "mode": self.mode, "in_features": self.in_channels, "out_features": self.out_channels,
                "bias": self.bias is not None, "geometry": self.geometry, "folded": self.folded}

    _weight_dtype = None  # `.weight`'s dtype after model.half() / .to(dtype); None: float32
    bias = BiasInComputeDtype("_weight_dtype")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype `.weight` / `.bias` report and outputs default to (a conv replacing a half
        one computes in it: transforms.adopt_float_dtype)."""
        return self._weight_dtype or torch.float32

    def _apply(self, fn, recurse=True):
        """model.half() / .to(dtype) change the compute dtype only: the scales and bias stay fp32
        (the kernel's epilogue is fp32) and the output takes the input's dtype; float64 is a
        TypeError, as for the compressed linears. `.weight` reports the new dtype: ViT and CLIP
        cast their pixels to the patch conv's weight dtype, and a half model's LayerNorm after
        it refused the float32 output."""
        target = target_dtype(self, fn, self._weight_dtype or torch.float32)
        result = super()._apply(keeping_dtypes(fn), recurse)
        object.__setattr__(self, "_weight_dtype", None if target == torch.float32 else target)
        return result

    # ------------------------------------------------------------ nn.Conv surface

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in / groups, *kernel] (read-only; its values computed
        when used, lazy_weight.py)."""
        dtype, device = self._weight_dtype or torch.float32, self.qweight.device  # as of this read

        def compute():
            w = self.qweight.float() * self.w_scales.reshape((-1,) + (1,) * (self.sp + 1))
            return w.to(device=device, dtype=dtype)
        return lazy_weight(compute, self.qweight.shape, dtype, device)

    def dense_bytes(self) -> int:
        return 4 * self.qweight.numel() + (4 * self.out_channels if self.geometry["bias"] else 0)

    def describe(self) -> str:
        return "w8a8 u8" if self.mode == "static" else "int8 dyn/call"

    def note(self) -> str:
        notes = [f"BatchNorm {self.folded} folded in" if self.folded else "",
                 f"{self.epilogue} fused" if self.epilogue else ""]
        return "; ".join(n for n in notes if n)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, mode={self.mode}, "
                f"bias={self.bias is not None}")

    # ------------------------------------------------------------ forward

    def check_input(self, x) -> None:
        kind = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{kind}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dtype not in COMPUTE_DTYPES:  # float64 too: computed in fp32 it fooled gradcheck
            raise TypeError(f"{kind}: expected a float input (float32, bfloat16 or float16), got {x.dtype}")
        if x.dim() not in (self.sp + 1, self.sp + 2):
            raise ValueError(f"{kind}: expected a {self.sp + 2}-D [N, C, *spatial] (or {self.sp + 1}-D unbatched) "
                             f"input, got shape {tuple(x.shape)}")
        c = x.shape[-self.sp - 1]
        if c != self.in_channels:
            raise ValueError(f"{kind}: expected {self.in_channels} input channels, got {c} (input shape "
                             f"{tuple(x.shape)})")
        if x.device.type != "cpu":
            raise TypeError(f"{kind}: the int8 convolution runs on the CPU, got an input on {x.device}")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, activation: str = "") -> torch.Tensor:
        """conv(x), then `+ residual` and the activation ('relu', 'relu6', 'silu', 'gelu')
        where given: the epilogue a fused model (quantization/conv_epilogue.py) hands over,
        run inside the kernel where it can be."""
        try:
            return self._forward(x, residual, activation)
        except (ValueError, TypeError) as e:
            note_layer(self, e)
            raise

    def _forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], activation: str) -> torch.Tensor:
        sig = _signature(x, residual, activation)
        if sig is not None and sig in self._checked:
            y = self._checked_call(x, residual, activation)
            if y is not None:
                return y
        self.check_input(x)
        if residual is not None or activation:
            conv_ops.check_activation(activation)
            if not self._fusable(x, residual):  # the same result the long way
                y = self.forward(x)
                return conv_ops.ACTIVATIONS[activation](y + residual if residual is not None else y)
            return self.kernel_forward(x, residual, activation, sig)
        if x.dim() == self.sp + 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        bias = trainable_bias(self)
        if needs_function(x, bias):
            return _FrozenConvFunction.apply(x, bias, self)
        return self.kernel_forward(x, sig=sig)

    def _checked_call(self, x: torch.Tensor, residual: Optional[torch.Tensor], activation: str
                      ) -> Optional[torch.Tensor]:
        """forward for an input signature whose checks passed on an earlier call that ran the
        static plan (`_checked`): only what can change between such calls is checked again
        (gradient recording, torch.compile / dispatch modes, the module's backend, and the
        buffers' identity inside _static_plan). At batch 1 the checks cost as much as the
        kernel. None: take the general path."""
        if self.backend == "reference" or (torch.is_grad_enabled() and (
                x.requires_grad or (residual is not None and residual.requires_grad))):
            return None
        if trainable_bias(self) is not None:  # direct_ok below refuses dual levels and torch.func
            return None
        if not _eager.direct_ok((x, residual) + self._state_tensors()):
            return None
        y = self._static_call(self._channels_last(x), residual, activation)
        return y if y is None or x.dtype is torch.float32 else y.to(x.dtype)

    def _fusable(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        """Whether the epilogue can run in the kernel: a batched fp32 input without gradient,
        and a residual that is an fp32 tensor of exactly the output's shape (no broadcast)."""
        if x.dim() != self.sp + 2 or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return False
        if needs_function(x, trainable_bias(self)):
            return False
        if residual is None:
            return True
        if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 or residual.device != x.device:
            return False
        if residual.requires_grad and torch.is_grad_enabled():
            return False
        sp = conv_ops.out_size(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)
        return tuple(residual.shape) == (x.shape[0], self.out_channels, *sp)

    def _params(self, xc: torch.Tensor, qmax: int) -> Tuple[float, int]:
        """(scale, zero point) of codes in [0, qmax]: the calibrated ones (static; re-spread over
        [0, 127] for 7-bit codes) or those of this input's range (dynamic)."""
        if self.mode == "static":
            s, zp = float(self.act_scale), int(self.act_zero_point)
            if qmax == 255:
                return s, zp
            lo, hi = -zp * s, (255 - zp) * s
        elif xc.numel() == 0:
            lo = hi = 0.0
        else:
            lo, hi = (float(v) for v in torch.aminmax(xc))
            if not (abs(lo) < float("inf") and abs(hi) < float("inf")):
                raise ValueError(f"{type(self).__name__}: the input contains NaN or Inf; activation "
                                 f"quantization needs finite values")
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / qmax
        scale = scale if scale > 0 else 1.0
        return scale, int(min(max(round(-lo / scale), 0), qmax))

    def _kernel(self, shape: tuple, zp: int) -> tuple:
        """(packed weights, or None for the reference; whether codes must be 7-bit) for an input
        shape, chosen and packed once."""
        key_w = tensor_identity(self.qweight)
        if key_w != self._kernels_key:  # new weights (load_state_dict, to()): repack
            self._kernels, self._kernels_key = {}, key_w
            self._torch_kernels = torch_onednn.PackedCache()
        key = (tuple(shape), zp != 0)
        hit = self._kernels.get(key)
        if hit is None:
            args = (torch.empty(shape, dtype=torch.uint8), self.qweight, self._run_stride, self.padding,
                    self.dilation, self.groups, zp, self.bias is not None)
            impl = conv_ops.impl_name(*args)
            if not impl or impl.startswith("ref"):  # no fast kernel: the exact reference
                hit = (None, False)
            else:
                hit = (conv_ops.pack_weight(*args), not conv_ops.is_exact_8bit(impl))
            if len(self._kernels) >= _MAX_SHAPES:
                self._kernels.clear()
            self._kernels[key] = hit
        return hit

    def _torch_kernel(self, shape: tuple, scale: float, zp: int) -> Optional[torch.Tensor]:
        """qweight packed for torch's kernel (ops/torch_onednn.py) at this channels-last input
        shape, or None where that route is off, does not pay at this size or the conv is not 2-D.
        Call after _kernel (which drops these when the weights change)."""
        if self.sp != 2 or not torch_onednn.available():
            return None
        n, *spatial, c = shape
        if not self._pays(n, spatial):
            return None
        key = (tuple(shape), zp != 0)
        hit = self._torch_kernels.get(key)
        if hit is None:
            hit = torch_onednn.prepack(self.qweight, self.w_scales, scale, zp, self._run_stride, self.padding,
                                       self.dilation, self.groups, [n, c, *spatial])
            if len(self._torch_kernels) >= _MAX_SHAPES:
                self._torch_kernels.clear()
            self._torch_kernels[key] = hit
        return hit

    def _pays(self, n: int, spatial) -> bool:
        """Whether n inputs of this spatial size (after the 1 x 1 stride pick) are enough work
        for torch's kernel (torch_onednn.pays)."""
        out_sp = conv_ops.out_size(spatial, self.kernel_size, self._run_stride, self.padding, self.dilation)
        outputs = n * math.prod(out_sp) * self.out_channels
        return torch_onednn.pays(outputs * self.qweight[0].numel(), outputs, n)

    def picked_size(self, spatial) -> list:
        """The input's spatial size as the kernels see it: a strided 1 x 1 conv reads every
        stride-th position (`_pick`)."""
        if self._pick is None:
            return list(spatial)
        return [(s + st - 1) // st for s, st in zip(spatial, self.stride)]

    def input_pays(self, x_shape: torch.Size) -> bool:
        """_pays for an [N, C, *spatial] input, kept per shape: conv chains ask on every call
        (int8_conv_chain.py), and at batch 1 the answer is no."""
        hit = self._pays_by_shape.get(x_shape)
        if hit is None:
            hit = len(x_shape) == self.sp + 2 and self._pays(x_shape[0], self.picked_size(x_shape[2:]))
            if len(self._pays_by_shape) >= 4 * _MAX_SHAPES:
                self._pays_by_shape.clear()
            self._pays_by_shape[x_shape] = hit
        return hit

    def _static_plan(self, shape: torch.Size, tensors: tuple) -> tuple:
        """For a static-mode input shape: (output shape, the native call's arguments before the
        output: scale, zero point, code max, views of qweight / packed / w_scales / bias; those
        after it: the geometry; torch's route's arguments or None), or () where no fast kernel
        runs. Cached while the module's tensors are the same objects, unmodified, so a call pays
        no scalar reads, packing lookups or views."""
        key = (shape, torch_onednn.available()) + tuple(tensor_identity(t) for t in tensors)
        plan = self._plans.get(key)
        if plan is None:
            scale, zp = self._params(None, 255)
            packed, seven_bit = self._kernel(shape, zp)
            qmax = 127 if packed is not None and seven_bit else 255
            if qmax < 255:  # no VNNI: codes in [0, 127] (see the module doc)
                scale, zp = self._params(None, qmax)
                packed, _ = self._kernel(shape, zp)
            sp = conv_ops.out_size(shape[1:-1], self.kernel_size, self._run_stride, self.padding, self.dilation)
            geometry = (list(self._run_stride), list(self.padding), list(self.dilation), self.groups)
            tpacked = None if packed is None else self._torch_kernel(shape, scale, zp)
            bias = stored_bias(self)
            plan = () if packed is None else (
                (shape[0], *sp, self.out_channels),
                (scale, zp, qmax, _views.view(self.qweight, "qweight"), _views.view(packed, "packed"),
                 _views.view(self.w_scales, "w_scales"), _views.optional_view(bias, "bias")),
                geometry,
                None if tpacked is None else (scale, zp, qmax, tpacked, self.w_scales, bias, *geometry))
            if len(self._plans) >= _MAX_SHAPES:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _state_tensors(self) -> tuple:
        """Buffers and (a bias re-set as one) parameters: what the direct call reads."""
        return tuple(self._buffers.values()) + tuple(self._parameters.values())

    def _current_plan(self, shape: torch.Size) -> tuple:
        """_static_plan for this shape and the module's present buffers."""
        b, p = self._buffers, self._parameters  # a bias re-set as a Parameter (BitFit) is read too
        return self._static_plan(shape, tuple(b[n] if n in b else p.get(n) for n in
                                              ("qweight", "w_scales", "bias", "act_scale", "act_zero_point")))

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """x as the kernels read it: fp32, channels last, contiguous (a strided 1 x 1 conv's
        positions picked first)."""
        if x.requires_grad:  # each op below costs ~1 us per call where it has nothing to do
            x = x.detach()
        if x.dtype is not torch.float32:
            x = x.to(torch.float32)
        xc = x.movedim(1, -1)
        return (xc[self._pick] if self._pick else xc).contiguous()

    def _static_call(self, xc: torch.Tensor, res: Optional[torch.Tensor], activation: str
                     ) -> Optional[torch.Tensor]:
        """The static-mode product of the cached plan ([N, OC, *spatial], channels-last
        strides, fp32): torch's oneDNN where the plan has it and it fuses this epilogue, else
        one native call. None where no plan or kernel runs (nothing written)."""
        plan = self._current_plan(xc.shape)
        if not plan:
            return None
        if plan[3] is not None and torch_onednn.takes(res is not None, activation):  # torch's threads
            return torch_onednn.conv2d_quantizing(xc, *plan[3], res, activation)
        out_shape, before_out, after_out, _ = plan
        rc = None if res is None else res.movedim(1, -1).contiguous()  # channels last for our kernel
        out = torch.empty(out_shape)
        if _C.conv_int8_quantizing_run(_views.view(xc, "x"), *before_out, _views.view(out, "out"), *after_out,
                                       _views.optional_view(rc, "residual"), activation):
            return out.movedim(-1, 1)
        return None

    def kernel_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                       activation: str = "", sig: Optional[tuple] = None) -> torch.Tensor:
        """The product after forward's checks. sig: forward's _signature of this call, kept
        in `_checked` when the static plan ran it (later calls like it skip the checks)."""
        xc = self._channels_last(x)
        res = None if residual is None else residual.detach()
        eager = _eager.direct_ok((xc, res) + self._state_tensors())
        torch_route = eager and torch_onednn.takes(res is not None, activation)
        if self.mode == "static" and self.backend != "reference" and xc.numel() > 0 and eager:
            y = self._static_call(xc, res, activation)
            if y is not None:
                if sig is not None:
                    if len(self._checked) >= 4 * _MAX_SHAPES:
                        self._checked.clear()
                    self._checked.add(sig)
                return y.to(x.dtype)
        scale, zp = self._params(xc, 255)
        packed, qmax = None, 255
        if self.backend != "reference" and xc.numel() > 0:
            packed, seven_bit = self._kernel(xc.shape, zp)
            if packed is not None and seven_bit:  # no VNNI: codes in [0, 127] (see the module doc)
                qmax = 127
                scale, zp = self._params(xc, qmax)
                packed, _ = self._kernel(xc.shape, zp)
        tpacked = self._torch_kernel(xc.shape, scale, zp) if packed is not None and torch_route else None
        bias = stored_bias(self)
        if tpacked is not None:
            out = torch_onednn.conv2d_quantizing(xc, scale, zp, qmax, tpacked, self.w_scales, bias,
                                                 self._run_stride, self.padding, self.dilation, self.groups, res,
                                                 activation)
            return out.to(x.dtype)
        rc = None if res is None else res.movedim(1, -1).contiguous()
        if packed is not None:
            out = conv_ops.conv_int8_quantizing(xc, scale, zp, qmax, self.qweight, self.w_scales, bias,
                                                self._run_stride, self.padding, self.dilation, self.groups, packed,
                                                rc, activation)
        else:  # the exact reference
            backend = "reference" if self.backend == "reference" else "auto"
            q = ops.quantize_static(xc.reshape(-1, self.in_channels), scale, zp, dtype=torch.uint8, backend=backend)
            out = conv_ops.conv_int8_reference(q.reshape(xc.shape), self.qweight, self.w_scales, bias, scale, zp,
                                               self._run_stride, self.padding, self.dilation, self.groups, rc,
                                               activation)
        return out.movedim(-1, 1).to(x.dtype)


def _signature(x, residual, activation: str) -> Optional[tuple]:
    """What forward's checks read of a call, for plain CPU tensors (else None): the input's and
    residual's shape, strides and dtype, and the activation."""
    if type(x) is not torch.Tensor or not x.is_cpu:
        return None
    if residual is None:
        return x.shape, x.stride(), x.dtype, activation
    if type(residual) is not torch.Tensor or not residual.is_cpu:
        return None
    return x.shape, x.stride(), x.dtype, activation, residual.shape, residual.stride(), residual.dtype


class Int8Conv1d(_Int8ConvNd):
    kind = "int8_conv1d"
    sp = 1
    float_type = nn.Conv1d


class Int8Conv2d(_Int8ConvNd):
    kind = "int8_conv2d"
    sp = 2
    float_type = nn.Conv2d


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm was folded into the preceding conv (its scale and shift live in
    that conv's weights and bias now), so saved files and summaries account for it."""

    kind = "folded_batchnorm"
    action = "folded"

    def __init__(self, num_features: int, into: str, float_kind: str = "BatchNorm2d"):
        super().__init__()
        self.num_features, self.into, self.float_kind = num_features, into, float_kind

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["in_features"], spec["into"], spec["float_kind"])

    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        return type(mod).__name__ == spec["float_kind"] and getattr(mod, "num_features", None) == spec["in_features"]

    def spec(self) -> dict:
        return {"kind": self.kind, "format": "folded", "in_features": self.num_features,
                "out_features": self.num_features, "bias": False, "into": self.into, "float_kind": self.float_kind}

    def dense_bytes(self) -> int:
        return 4 * 4 * self.num_features + 8  # weight, bias, running mean / var, batch count

    def describe(self) -> str:
        return "folded"

    def note(self) -> str:
        return f"folded into {self.into}"
