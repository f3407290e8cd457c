"""The CUDA kernels against the CPU ones: bit for bit for quantize/dequantize, and
weight-only linear against a float64 product of the CPU-dequantized weight."""
import pytest
import torch

import tensorslim as ts
from tensorslim import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and getattr(ts._C, "has_cuda", False)),
        reason="needs an NVIDIA GPU and tensorslim built with its CUDA kernels",
    ),
]

FORMATS = ["int8", "uint8", "int4", "uint4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _data(rows, cols, seed, dtype=torch.float32, asym=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if cols:
        x[:, ::37] *= 8  # outliers, so groups differ in range
    x = x * 0.5 + 0.7 if asym else x
    return x.to(dtype)


def _granularities(cols):
    # 6 is not a multiple of a 16-byte packet: the kernels' scalar paths.
    return [ts.PER_TENSOR, cols] + [g for g in (6, 32, 64, 128, 256) if cols % g == 0]


def _assert_same(x_cpu, x_gpu, fmt, group):
    """CUDA quantize/dequantize of x_gpu equal the CPU's of x_cpu, bit for bit."""
    q, s, z = ops.quantize(x_cpu, fmt, group)
    gq, gs, gz = ops.quantize(x_gpu, fmt, group)
    assert gq.is_cuda and gq.dtype == q.dtype and torch.equal(gq.cpu(), q), (fmt, group)
    assert torch.equal(gs.cpu(), s), (fmt, group)
    assert (z is None) == (gz is None) and (z is None or torch.equal(gz.cpu(), z)), (fmt, group)
    cols = x_cpu.shape[1]
    for dtype in DTYPES:
        d = ops.dequantize(q, s, z, fmt, group, cols, dtype)
        gd = ops.dequantize(gq, gs, gz, fmt, group, cols, dtype)
        assert gd.is_cuda and torch.equal(gd.cpu(), d), (fmt, group, dtype)
    return gq, gs, gz


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(3, 96), (7, 264), (5, 37), (4, 512), (17, 2048), (1, 1)])
def test_quantize_bit_exact(fmt, dtype, shape):
    rows, cols = shape
    x = _data(rows, cols, rows * 1000 + cols, dtype, fmt.startswith("u"))
    xg = x.cuda()
    for group in _granularities(cols):
        if fmt.endswith("4") and group not in (ts.PER_TENSOR, cols) and group % 2:
            continue
        _assert_same(x, xg, fmt, group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_strided_views(fmt, dtype):
    wide = _data(9, 300, 7, dtype, fmt.startswith("u"))
    wide_g = wide.cuda()
    cases = [
        (wide[:, :256], wide_g[:, :256]),  # rows strided by 300
        (wide[:, 1:257], wide_g[:, 1:257]),  # rows start off a 16-byte boundary
        (wide.t()[:128, :9], wide_g.t()[:128, :9]),  # column stride != 1
    ]
    for x, xg in cases:
        assert not xg.is_contiguous()
        for group in (ts.PER_TENSOR, x.shape[1], 32 if x.shape[1] % 32 == 0 else x.shape[1]):
            _assert_same(x, xg, fmt, group)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_unaligned_codes(fmt):
    x = _data(6, 128, 11, asym=fmt.startswith("u"))
    gq, gs, gz = ops.quantize(x.cuda(), fmt, 32)
    q, s, z = ops.quantize(x, fmt, 32)
    wide = torch.zeros(6, gq.shape[1] + 3, dtype=gq.dtype, device="cuda")
    wide[:, 1:1 + gq.shape[1]] = gq
    for dtype in DTYPES:
        got = ops.dequantize(wide[:, 1:1 + gq.shape[1]], gs, gz, fmt, 32, 128, dtype)
        assert torch.equal(got.cpu(), ops.dequantize(q, s, z, fmt, 32, 128, dtype))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ["int8", "uint4"])
@pytest.mark.parametrize("group", [ts.PER_TENSOR, 64, 32])
def test_nonfinite_raises_naming_the_row(fmt, group, value):
    x = _data(5, 64, 1).cuda()
    x[2, 5] = value
    x[4, 60] = value
    with pytest.raises(ValueError, match=r"NaN or Inf \(row 2\)"):
        ops.quantize(x, fmt, group)
    torch.cuda.synchronize()  # the device is still usable afterwards
    ops.quantize(x[:2], fmt, group)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_tensors(fmt):
    for rows, cols, group in [(0, 64, ts.PER_TENSOR), (0, 64, 64), (0, 64, 32),
                              (3, 0, ts.PER_TENSOR), (3, 0, 0)]:
        x = torch.empty(rows, cols)
        gq, gs, gz = _assert_same(x, x.cuda(), fmt, group)
        if group == ts.PER_TENSOR:
            assert gs.item() == 1.0 and (gz is None or gz.item() == 0)


def test_uses_the_current_stream():
    x = _data(64, 1024, 5).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q, sc, _ = ops.quantize(x, "int4", 128)
        d = ops.dequantize(q, sc, None, "int4", 128, 1024, torch.float32)
    torch.cuda.current_stream().wait_stream(s)
    q0, s0, _ = ops.quantize(x.cpu(), "int4", 128)
    assert torch.equal(q.cpu(), q0) and torch.equal(sc.cpu(), s0)
    assert torch.equal(d.cpu(), ops.dequantize(q0, s0, None, "int4", 128, 1024, torch.float32))


# ---------------------------------------------------------------- weight-only linear

# Relative Frobenius error bounds. The weight is exact in fp32 (the fused kernels) or
# rounded once to the activation's 16-bit type (the cuBLAS workspace); accumulation is
# fp32 everywhere; the output is rounded once to x's dtype.
# fp32: accumulation error ~ sqrt(K) * 2^-24 ~ 3e-6 for K = 2048; bound 1e-4.
# fp16 / bf16: each rounding has relative error <= 2^-11 / 2^-8 with RMS about a third
# less, and random-signed errors in a dot product grow like its value does, so output
# plus weight rounding gives ~5e-4 (fp16) and ~3e-3 (bf16); bound 1e-2.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _check_linear(fmt, dtype, M, K, N, group, bias=True, x=None, seed=0):
    w = _data(N, K, seed + 1, asym=fmt.startswith("u"))
    q, s, z = ops.quantize(w, fmt, group)
    wdq = ops.dequantize(q, s, z, fmt, group, K, torch.float32)
    if x is None:
        x = _data(M, K, seed + 2, dtype).cuda()
    b = torch.randn(N, generator=torch.Generator().manual_seed(seed + 3)) if bias else None
    got = ops.linear_weight_only(x, q.cuda(), s.cuda(), None if z is None else z.cuda(),
                                 None if b is None else b.cuda(), fmt, group, K)
    assert got.dtype == dtype and got.shape == (x.shape[0], N) and got.is_cuda
    ref = x.cpu().double() @ wdq.double().T
    if b is not None:
        ref += b.double()
    err = (got.cpu().double() - ref).norm() / ref.norm()
    assert err < TOL[dtype], (fmt, dtype, M, K, N, group, float(err))


@pytest.mark.parametrize("M", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_weight_only(fmt, dtype, M):
    K, N = 256, 72  # N not a multiple of the kernels' row blocks
    for group in (K, 128, 64, 32):
        _check_linear(fmt, dtype, M, K, N, group, bias=group != 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_weight_only_shapes(fmt, dtype):
    # K over one shared-memory tile of activations (the GEMV loops over tiles).
    _check_linear(fmt, dtype, 8, 2048, 40, 128)
    _check_linear(fmt, dtype, 5, 2048, 33, 2048)
    # K or group not a multiple of a 16-byte chunk: the code-by-code kernel.
    _check_linear(fmt, dtype, 1, 100, 24, 100)
    _check_linear(fmt, dtype, 4, 96, 17, 6)
    _check_linear(fmt, dtype, 12, 96, 17, 6)
    # Rows of x strided (a slice of a wider activation).
    wide = _data(9, 300, 4, dtype).cuda()
    _check_linear(fmt, dtype, 9, 256, 48, 64, x=wide[:, :256])
    _check_linear(fmt, dtype, 2, 256, 48, 64, x=wide[:2, 8:264])


def test_linear_weight_only_empty_batch():
    q, s, _ = ops.quantize(_data(16, 64, 0), "int8", 64)
    out = ops.linear_weight_only(torch.empty(0, 64, device="cuda"), q.cuda(), s.cuda(), None,
                                 None, "int8", 64, 64)
    assert out.shape == (0, 16) and out.is_cuda


def test_device_count():
    assert ts._C.cuda_device_count() == torch.cuda.device_count()
