"""The CUDA low-bit decoders against the CPU: dequantize bit for bit, linear against a
float64 product of the CPU-dequantized weight (skipped without a GPU)."""
import pytest
import torch

import tensorslim as ts
from tensorslim import ops
from tensorslim.formats import get_format

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and getattr(ts._C, "has_cuda", False)),
        reason="needs an NVIDIA GPU and tensorslim built with its CUDA kernels",
    ),
]

FORMATS = ["fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "int2", "uint3", "int5", "int8", "binary", "ternary"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_cpu_bit_for_bit(fmt):
    spec = get_format(fmt)
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(spec.id))
    for group in ([spec.block_size] if spec.block_size else [-1, 256, 32]):
        q, s, z, t = ops.quantize_lowbit(x, fmt, group)
        want = ops.dequantize_lowbit(q, s, z, t, fmt, group, 256)
        cuda = [None if v is None else v.cuda() for v in (q, s, z, t)]
        got = ops.dequantize_lowbit(*cuda, fmt, group, 256)
        assert got.is_cuda and torch.equal(got.cpu(), want), (fmt, group)


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_matches_float64(fmt):
    spec = get_format(fmt)
    group = spec.block_size or 32
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    q, s, z, t = ops.quantize_lowbit(w.cuda(), fmt, group)
    deq = ops.dequantize_lowbit(q.cpu(), s.cpu(), None if z is None else z.cpu(),
                                None if t is None else t.cpu(), fmt, group, 256).double()
    bias = torch.randn(40)
    for M in (1, 5, 19):
        x = torch.randn(M, 256)
        y = ops.linear_lowbit(x.cuda(), q, s, z, t, bias.cuda(), fmt, group, 256)
        want = x.double() @ deq.T + bias.double()
        assert float((y.cpu().double() - want).abs().max() / want.abs().max()) < 2e-6, (fmt, M)
