"""Finite weights near the fp32 limit quantize to finite codes in asymmetric formats.

hi - lo of a group spanning [-3e38, 3e38] overflows fp32 to Inf, which made the scale Inf
and every dequantized value NaN. Such groups now divide first; all other groups keep the
exact encoding they had (checked against the formula on ordinary data)."""
import pytest
import torch

from tensorslim import ops


def _huge_rows():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    x[0, 3], x[0, 9] = 3.0e38, -3.0e38      # the span overflows
    x[1, 5] = -3.3e38                       # one-sided: no overflow, near the limit
    x[2] *= 1e37
    return x


@pytest.mark.parametrize("fmt", ["uint8", "uint4", "uint3"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_asymmetric_formats_stay_finite_near_fp32_max(isa, fmt, backend):
    x = _huge_rows()
    q, scales, zps = ops.quantize(x, fmt, 32, backend=backend)
    assert torch.isfinite(scales).all()
    y = ops.dequantize(q, scales, zps, fmt, 32, x.shape[1], backend=backend)
    assert not torch.isnan(y).any()
    if fmt == "uint3":
        # 7 steps of 8.6e37: -3e38 lies nearest the grid point -4 steps = -3.43e38, past
        # fp32's range, so it decodes to -Inf, IEEE's rounding of that value. Not NaN.
        assert torch.isinf(y[0, 9]) and y[0, 9] < 0
        y[0, 9] = -3.4e38
    assert torch.isfinite(y).all()
    # Each group reconstructs within one step of its span (~span / (2^bits - 1)).
    steps = {"uint8": 255, "uint4": 15, "uint3": 7}[fmt]
    g = x.double().reshape(4, 2, 32)
    span = g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)
    err = (y.double().reshape(4, 2, 32) - g).abs().amax(-1)
    assert (err <= span / steps).all()


def test_ordinary_groups_keep_their_exact_scales():
    torch.manual_seed(1)
    x = torch.randn(8, 128) * 3
    q, scales, zps = ops.quantize(x, "uint8", 64)
    g = x.reshape(8, 2, 64)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    assert torch.equal(scales, (hi - lo) / 255)
    ref = ops.quantize(x, "uint8", 64, backend="reference")
    assert torch.equal(q, ref[0]) and torch.equal(scales, ref[1]) and torch.equal(zps, ref[2])
