"""Small weight-only linears from DECODE_GEMM_MIN_ROWS rows on: the weight decoded once by our
kernel, then torch's fp32 GEMM (ops/decode_gemm.py). Same result as the reference within fp32
rounding, on short last groups; only where it applies (auto, fp32, CPU, enough rows, a weight
of up to SMALL_WEIGHT values)."""
import pytest
import torch

from tensorslim import ops
from tensorslim.ops import decode_gemm

K, N = 200, 70  # 200 = 128 + a short group of 72
INTEGER = [("int8", K), ("uint4", 128), ("int4", 64)]
LOWBIT = ["fp8_e4m3", "nvfp4", "mxfp4", "int3"]


def _integer_layer(fmt, group):
    torch.manual_seed(0)
    w, b = torch.randn(N, K), torch.randn(N)
    q, s, z = ops.quantize(w, fmt, group)
    return lambda x, backend="auto": ops.linear_weight_only(x, q, s, z, b, fmt, group, K, backend)


def _lowbit_layer(fmt):
    torch.manual_seed(0)
    w, b = torch.randn(N, K), torch.randn(N)
    g = {"fp8_e4m3": K, "nvfp4": 16, "mxfp4": 32, "int3": 64}[fmt]  # int3: 3 x 64 + 8
    q, s, z, t = ops.quantize_lowbit(w, fmt, g)
    return lambda x, backend="auto": ops.linear_lowbit(x, q, s, z, t, b, fmt, g, K, backend)


LAYERS = [pytest.param(lambda f=f, g=g: _integer_layer(f, g), id=f"{f}-g{g}") for f, g in INTEGER] + \
         [pytest.param(lambda f=f: _lowbit_layer(f), id=f) for f in LOWBIT]


@pytest.mark.parametrize("make", LAYERS)
def test_large_batches_match_the_reference(make, decode_calls):
    layer = make()
    x = torch.randn(3, decode_gemm.DECODE_GEMM_MIN_ROWS, K)  # 3 x 32 rows
    got, ref = layer(x), layer(x, "reference")
    assert decode_calls == [3 * decode_gemm.DECODE_GEMM_MIN_ROWS]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make", LAYERS)
def test_only_where_it_applies(make, decode_calls):
    layer = make()
    rows = decode_gemm.DECODE_GEMM_MIN_ROWS
    layer(torch.randn(rows - 1, K))                 # below the threshold: the fused kernels
    layer(torch.randn(rows, K), "native")           # an explicit backend is kept
    assert decode_calls == []
    layer(torch.randn(rows, K))
    assert decode_calls == [rows]


@pytest.mark.parametrize("fmt,group", INTEGER)
def test_bf16_integer_layers_stay_on_our_kernels(fmt, group, decode_calls):
    # Their kernels take bf16 activations (from 16 rows on AVX512-BF16 the decoded weights are
    # rounded to bf16 too and multiplied by vdpbf16ps; docs/formats.md), so these layers stay on
    # them. (Low-bit layers compute in fp32 for any input dtype.) The bf16 output and weights
    # keep 8 significant bits: the error is a small fraction of the outputs' scale, not of each
    # output, as the C++ test of those tiles bounds it (PanelGemm.BFloat16ActivationsPastSixteenRows).
    layer = _integer_layer(fmt, group)
    x = torch.randn(decode_gemm.DECODE_GEMM_MIN_ROWS, K).bfloat16()
    want = layer(x.float(), "reference")
    assert (layer(x).float() - want).abs().max() <= 1e-2 * want.abs().max()
    assert decode_calls == []


def test_gradient_reaches_the_input(decode_calls):
    layer = _integer_layer("uint4", 128)
    x = torch.randn(decode_gemm.DECODE_GEMM_MIN_ROWS, K, requires_grad=True)
    layer(x).sum().backward()
    # d sum(x W^T + b) / dx[m, k] = sum_n W[n, k]: the rows of eye(K) W^T + b, less the bias.
    w_col_sums = layer(torch.eye(K), "reference").sum(1) - layer(torch.zeros(1, K), "reference").sum()
    torch.testing.assert_close(x.grad, w_col_sums.expand_as(x), rtol=1e-4, atol=1e-3)


def test_large_weights_stay_on_the_native_dispatch(decode_calls, monkeypatch):
    # Above SMALL_WEIGHT values the decoded weight would leave the cache: the C++ dispatch runs
    # (oneDNN on AVX-512, our panel GEMM on AVX2). Shrinking the limit makes this layer "large".
    monkeypatch.setattr(decode_gemm, "SMALL_WEIGHT", N * K - 1)
    layer = _integer_layer("uint4", 128)
    x = torch.randn(4 * decode_gemm.DECODE_GEMM_MIN_ROWS, K)
    torch.testing.assert_close(layer(x), layer(x, "reference"), rtol=1e-5, atol=1e-4)
    assert decode_calls == []


@pytest.mark.parametrize("vendor,isa,rows", [("AuthenticAMD", "avx512", decode_gemm.AMD_DECODE_GEMM_MIN_ROWS),
                                             ("AuthenticAMD", "avx2", decode_gemm.AMD_DECODE_GEMM_MIN_ROWS),
                                             ("AuthenticAMD", "scalar", decode_gemm.DECODE_GEMM_MIN_ROWS),
                                             ("GenuineIntel", "avx512", decode_gemm.DECODE_GEMM_MIN_ROWS),
                                             ("", "avx2", decode_gemm.DECODE_GEMM_MIN_ROWS)])
def test_amd_cpus_keep_the_panel_gemm_to_thousands_of_rows(vendor, isa, rows, monkeypatch):
    # Measured on Zen 4 (AVX-512 and capped at AVX2): our panel GEMM beat decode + torch's GEMM for
    # small weights up to ~3000 rows; scalar kernels and other CPUs decode from 64 rows.
    from tensorslim._native import _C

    monkeypatch.setattr(decode_gemm, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(_C, "active_isa", lambda: isa)
    assert decode_gemm.decode_min_rows() == rows
    x = torch.randn(rows, K)
    assert decode_gemm.applies(x, "auto", N * K) and not decode_gemm.applies(x[:-1], "auto", N * K)
