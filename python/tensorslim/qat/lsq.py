"""Learned Step Size Quantization (Esser et al., ICLR 2020, arXiv:1902.08153).

The scale is a parameter; its gradient is multiplied by g = 1 / sqrt(numel_per_scale * qmax)
so that scale and weight updates have comparable relative size. The forward value is
exactly the stored scale (a custom autograd function, not the `x*g + (x - x*g).detach()`
trick, whose rounding would change the forward value and break convert()'s exactness).
"""
import math

import torch

MIN_SCALE = 1e-8  # a learned scale is clamped here so it never reaches 0 or turns negative


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g: float):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity forward, gradient times g backward."""
    return _GradScale.apply(x, g)


def lsq_gradient_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's g = 1 / sqrt(N * Q_P): N weights share the scale, Q_P is the largest positive code."""
    return 1.0 / math.sqrt(max(1, numel_per_scale) * max(1, qmax))


def effective_scale(scale: torch.Tensor, g: float) -> torch.Tensor:
    """The scale the forward uses (and convert() stores): clamped positive, LSQ-scaled gradient."""
    return grad_scale(scale, g).clamp_min(MIN_SCALE)
