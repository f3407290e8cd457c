"""INT8 convolution (Conv1d / Conv2d): u8 channels-last activation codes x s8 weights, fp32 out.
The specification is in include/tensorslim/conv_int8.h; conv_int8_reference implements it
in plain PyTorch (the integer sums in float64, exact for any realistic window: |acc| <=
255 * 128 * C * kernel area < 2^53).

Layouts: qx [N, *spatial, C] uint8 (channels last), qweight [OC, C / groups, *kernel] int8,
out [N, *out_spatial, OC] float32 (channels last). Padding is symmetric, as nn.Conv pads.

Epilogue: residual (float32, out's shape and layout) is added to out, then the activation
("relu", "relu6", "silu" or "gelu" (erf)) is applied, as oneDNN post-ops while the output is in
registers (a model's `relu(conv(x) + shortcut)` in one pass instead of three).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _views
from .._native import _C
from . import _eager
from .int8 import quantize_static


def out_size(in_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int]) -> List[int]:
    """The output's spatial size, as nn.Conv computes it."""
    if any(not isinstance(s, int) or s < 1 for s in stride) or any(not isinstance(d, int) or d < 1 for d in dilation):
        raise ValueError(f"conv_int8: stride and dilation must be ints >= 1, got {list(stride)}, {list(dilation)}")
    return [(i + 2 * p - d * (k - 1) - 1) // s + 1
            for i, k, s, p, d in zip(in_size, kernel, stride, padding, dilation)]


def _out(qx: torch.Tensor, qweight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    sp = out_size(qx.shape[1:-1], qweight.shape[2:], stride, padding, dilation)
    return torch.empty(qx.shape[0], *sp, qweight.shape[0], dtype=torch.float32)


def impl_name(qx, qweight, stride, padding, dilation, groups: int, zero_point: int, has_bias: bool) -> str:
    """oneDNN's kernel for this convolution ('' where it has none or oneDNN is unusable)."""
    out = _out(qx, qweight, stride, padding, dilation)
    return _C.conv_int8_impl(_views.view(qx, "qx"), _views.view(qweight, "qweight"), _views.view(out, "out"),
                             list(stride), list(padding), list(dilation), int(groups), zero_point != 0,
                             bool(has_bias))


def is_exact_8bit(impl: str) -> bool:
    """oneDNN's u8 x s8 kernels sum pairs of products in saturating int16 unless they use
    VNNI (AVX10 includes it) or AMX; those take full 8-bit codes, the others only codes in
    [0, 127]."""
    return bool(impl) and _C.onednn_int8_is_exact(impl)


def pack_weight(qx, qweight, stride, padding, dilation, groups: int, zero_point: int,
                has_bias: bool) -> Optional[torch.Tensor]:
    """qweight in the layout oneDNN's kernel for this input shape reads (uint8 bytes), or None
    where there is no kernel. Derived data: kept by the module per input shape, never saved."""
    if not _eager.is_plain(qweight):  # no data to pack (fake / meta weights): the reference runs
        return None
    with _eager.untraced():
        out = _out(qx, qweight, stride, padding, dilation)
        args = (_views.view(qx, "qx"), _views.view(qweight, "qweight"), _views.view(out, "out"), list(stride),
                list(padding), list(dilation), int(groups), zero_point != 0, bool(has_bias))
        n = _C.conv_int8_packed_bytes(*args)
        if n <= 0:
            return None
        packed = torch.empty(n, dtype=torch.uint8)
        _C.conv_int8_pack(*args, _views.view(packed, "packed"))
    return packed


ACTIVATIONS = {"": lambda t: t, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu}


def apply_epilogue(out: torch.Tensor, residual: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """The epilogue in PyTorch (paths without the fused one); adds into `out`."""
    if residual is not None:
        out.add_(residual)
    return ACTIVATIONS[activation](out)


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def _conv_int8_impl(qx: torch.Tensor, qweight: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor,
                    bias: Optional[torch.Tensor], act_scale: float, zero_point: int, stride: List[int],
                    padding: List[int], dilation: List[int], groups: int, residual: Optional[torch.Tensor] = None,
                    activation: str = "") -> torch.Tensor:
    out = _out(qx, qweight, stride, padding, dilation)
    args = (_views.view(qx, "qx"), _views.view(qweight, "qweight"), _views.view(packed, "packed"),
            _views.view(w_scales, "w_scales"), _views.optional_view(bias, "bias"), float(act_scale),
            int(zero_point), _views.view(out, "out"), list(stride), list(padding), list(dilation), int(groups))
    if _C.conv_int8_run(*args, _views.optional_view(residual, "residual"), activation):
        return out
    if (residual is not None or activation) and _C.conv_int8_run(*args, None, ""):  # no fused kernel
        return apply_epilogue(out, residual, activation)
    # oneDNN became unusable (e.g. in a forked worker): the reference is exact
    return conv_int8_reference(qx, qweight, w_scales, bias, act_scale, zero_point, stride, padding, dilation, groups,
                               residual, activation)


_conv_int8 = torch.library.custom_op("tensorslim::conv_int8", mutates_args=(), device_types="cpu")(_conv_int8_impl)


@_conv_int8.register_fake
def _conv_int8_fake(qx, qweight, packed, w_scales, bias, act_scale, zero_point, stride, padding, dilation,
                    groups, residual=None, activation=""):
    sp = out_size(qx.shape[1:-1], qweight.shape[2:], stride, padding, dilation)
    return qx.new_empty(qx.shape[0], *sp, qweight.shape[0], dtype=torch.float32)


def conv_int8(qx: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
              act_scale: float, zero_point: int, stride, padding, dilation, groups: int,
              packed: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
              activation: str = "") -> torch.Tensor:
    """out = conv(qx - zero_point, qweight) * act_scale * w_scales[oc] + bias[oc], channels last,
    then the epilogue (+ residual, activation). packed: pack_weight(...) for this input shape;
    None runs the reference."""
    if qx.dtype != torch.uint8 or qx.dim() not in (3, 4):
        raise TypeError(f"qx: expected uint8 [N, *spatial, C] codes, got {qx.dtype} {tuple(qx.shape)}")
    if qweight.dtype != torch.int8 or qweight.dim() != qx.dim():
        raise TypeError(f"qweight: expected int8 [OC, C/groups, *kernel], got {qweight.dtype} "
                        f"{tuple(qweight.shape)}")
    residual = _check_residual(residual, qx, qweight, stride, padding, dilation)
    check_activation(activation)
    if packed is None:
        return conv_int8_reference(qx, qweight, w_scales, bias, act_scale, zero_point, stride, padding,
                                   dilation, groups, residual, activation)
    # Eager CPU calls skip the custom-op dispatch (~60 us, more than a small conv takes);
    # torch.compile, tracing (make_fx, jit.trace) and fake / meta tensors go through the op and
    # its fake implementation (a fake tensor's data pointer reached oneDNN and crashed).
    args = (qx.contiguous(), qweight.contiguous(), packed, w_scales.contiguous(),
            None if bias is None else bias.contiguous())
    run = _conv_int8_impl if _eager.direct_ok(args + (residual,)) else _conv_int8
    return run(*args, float(act_scale), int(zero_point), list(stride), list(padding), list(dilation), int(groups),
               residual, activation)


def _check_residual(residual, qx, qweight, stride, padding, dilation) -> Optional[torch.Tensor]:
    """The residual as the kernel reads it (float32, contiguous channels last), or a clear error."""
    if residual is None:
        return None
    want = [qx.shape[0], *out_size(qx.shape[1:-1], qweight.shape[2:], stride, padding, dilation), qweight.shape[0]]
    if not isinstance(residual, torch.Tensor) or list(residual.shape) != want or not residual.is_floating_point():
        got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"residual: expected a float [N, *out_spatial, OC] = {tuple(want)} tensor (channels last), "
                         f"got {got}")
    return residual.to(torch.float32).contiguous()


def conv_int8_quantizing(xc: torch.Tensor, act_scale: float, zero_point: int, code_max: int, qweight: torch.Tensor,
                         w_scales: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                         packed: torch.Tensor, residual: Optional[torch.Tensor] = None,
                         activation: str = "") -> torch.Tensor:
    """conv_int8 (epilogue included) on the codes min(quantize_static(xc, act_scale, zero_point),
    code_max) of fp32 channels-last xc [N, *spatial, C]. Eager CPU calls quantize and convolve
    in one native call (codes in a reused scratch buffer); torch.compile, fake tensors, and a
    oneDNN that cannot run go through the two ops."""
    w_scales, bias = w_scales.contiguous(), None if bias is None else bias.contiguous()  # read densely
    args = (xc, qweight, packed, w_scales, bias, residual)
    if _eager.direct_ok(args) and xc.dtype == torch.float32 and xc.dim() in (3, 4):
        xc = xc.contiguous()
        residual = _check_residual(residual, xc, qweight, stride, padding, dilation)
        check_activation(activation)
        out = _out(xc, qweight, stride, padding, dilation)
        if _C.conv_int8_quantizing_run(_views.view(xc, "x"), float(act_scale), int(zero_point), int(code_max),
                                       _views.view(qweight, "qweight"), _views.view(packed, "packed"),
                                       _views.view(w_scales, "w_scales"), _views.optional_view(bias, "bias"),
                                       _views.view(out, "out"), list(stride), list(padding), list(dilation),
                                       int(groups), _views.optional_view(residual, "residual"), activation):
            return out
    q = quantize_static(xc.reshape(-1, xc.shape[-1]), act_scale, zero_point, dtype=torch.uint8)
    if code_max < 255:
        q.clamp_(max=code_max)
    return conv_int8(q.reshape(xc.shape), qweight, w_scales, bias, act_scale, zero_point, stride, padding,
                     dilation, groups, packed, residual, activation)


def conv_int8_reference(qx, qweight, w_scales, bias, act_scale: float, zero_point: int, stride, padding,
                        dilation, groups: int, residual: Optional[torch.Tensor] = None,
                        activation: str = "") -> torch.Tensor:
    """The specification: the exact integer convolution, then the fp32 rescale and bias, then
    the epilogue."""
    conv = F.conv1d if qx.dim() == 3 else F.conv2d
    xc = (qx.to(torch.float64) - zero_point).movedim(-1, 1)  # padding adds real zeros: code zero_point
    acc = conv(xc, qweight.to(torch.float64), None, list(stride), list(padding), list(dilation), int(groups))
    shape = (1, -1) + (1,) * (qx.dim() - 2)
    out = acc.to(torch.float32) * (torch.tensor(act_scale, dtype=torch.float32) * w_scales.reshape(shape))
    if bias is not None:
        out = out + bias.reshape(shape)
    return apply_epilogue(out.movedim(1, -1).contiguous(), residual, check_activation(activation))
