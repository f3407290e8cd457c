"""Static Int8Conv2d in a row, each one's output read by nothing but the next (a ResNet basic
block's conv1 -> ReLU -> conv2, a bottleneck's three convs): where consecutive convs both run
on torch's oneDNN at this input shape, the first writes the second's uint8 input codes in its
epilogue (requantized at the second's calibrated scale, as torch.ao's quantized models hand
activations on) instead of an fp32 output that the second reads back and quantizes: a
quarter of the bytes written and no quantizer pass. Digits ResNet block pairs at batch 32,
2-core Zen 4: 9-23% per pair.

Wherever that route is not the one the module calls would take (hooks on a conv, gradients,
dynamic mode, calls too small for torch's kernel, other dtypes or shapes), the convs are
called as modules, as the model's own code does. quantization/conv_epilogue.py puts
`conv_chain(...)` into a fused forward.
"""
from typing import List, Optional, Sequence

import torch
from torch.nn.modules import module as _module

from ..ops import _eager, torch_onednn
from .int8_conv import Int8Conv2d


def conv_chain(convs: Sequence[torch.nn.Module], activations: Sequence[str], x: torch.Tensor,
               residual: Optional[torch.Tensor]) -> torch.Tensor:
    """convs[-1](... convs[1](convs[0](x, activation=activations[0]), activation=activations[1]) ...,
    residual=residual, activation=activations[-1])."""
    routes = _routes(convs, activations, x, residual)
    y, codes = x, None  # codes: the present conv's input, where the previous conv wrote them
    for i, (conv, route) in enumerate(zip(convs, routes)):
        res = residual if i == len(convs) - 1 else None
        if route is None:
            y = _module_call(conv, y, res, activations[i])
            continue
        scale, zp, qmax, packed, *rest = route
        if codes is None:
            codes = torch_onednn.quantize_input(conv._channels_last(y), scale, zp, qmax)
        nxt = routes[i + 1] if i + 1 < len(routes) else None
        if nxt is not None:
            codes = torch_onednn.conv2d_to_codes(codes, scale, zp, packed, *rest, activations[i], *nxt[:3])
        else:
            y, codes = torch_onednn.conv2d_from_codes(codes, scale, zp, packed, *rest, res, activations[i]), None
    return y


def _module_call(conv, x, residual, activation: str):
    if residual is None:
        return conv(x, activation=activation) if activation else conv(x)
    return conv(x, residual=residual, activation=activation)


def has_hooks(m: torch.nn.Module) -> bool:
    """Whether hooks are registered on this module itself (a call that bypasses it skips them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _routes(convs, activations, x, residual) -> List[Optional[tuple]]:
    """Per conv, its static plan's arguments for torch's route (Int8Conv2d._static_plan) where
    it runs there on this input, else None; a conv whose predecessor is None is None too."""
    routes: List[Optional[tuple]] = [None] * len(convs)
    first = convs[0]
    # cheapest first: at batch 1 the answer is no, and this runs per call
    if type(x) is not torch.Tensor or type(first) is not Int8Conv2d or not first.input_pays(x.shape):
        return routes
    if any(type(c) is not Int8Conv2d or has_hooks(c) for c in convs) or _module._global_forward_hooks \
            or _module._global_forward_pre_hooks:
        return routes
    if not (x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0 and x.shape[1] == first.in_channels):
        return routes  # a wrong channel count: the module call raises the error
    if residual is not None and not (type(residual) is torch.Tensor and residual.dtype == torch.float32):
        return routes
    if not _eager.direct_ok((x, residual) + tuple(t for c in convs for t in c._state_tensors())):
        return routes
    shape = torch.Size((x.shape[0], *first.picked_size(x.shape[2:]), x.shape[1]))
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1
        if not (conv.mode == "static" and conv.backend == "auto" and shape[-1] == conv.in_channels
                and (i == 0 or conv._pick is None)
                and torch_onednn.takes(last and residual is not None, activations[i])):
            break
        plan = conv._current_plan(shape)
        if not plan or plan[3] is None:
            break
        routes[i], shape = plan[3], torch.Size(plan[0])
    if routes[-1] is not None and residual is not None and tuple(residual.shape) != (
            shape[0], shape[-1], *shape[1:-1]):
        routes[-1] = None
    return routes
