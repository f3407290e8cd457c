"""Sparse linears with about half their weights or more kept, at large batches: the weight
decoded by our unpacker, then torch's fp32 GEMM (ops/decode_gemm.py, sparse_applies). The same
product as the sparse kernels within fp32 rounding; only where it applies (auto backend, fp32
CPU input, enough rows, enough weights kept, a weight of up to SMALL_WEIGHT values); the
unpacker's checks of malformed storage hold on that path too."""
import pytest
import torch

import tensorslim as ts
from tensorslim.ops import decode_gemm
from tensorslim.ops import sparse as S

from test_sparse_ops import close_to_float64, nm_keep

N, K = 24, 70  # K not a multiple of 4 or 8: the N:M tail group


ROWS, DENSE_ROWS = 80, 64  # the fixture's thresholds: half kept or more / 70% kept or more


@pytest.fixture
def decode_calls(decode_calls, monkeypatch):
    """conftest's record of decoded products, with the thresholds lowered so small layers
    reach them."""
    monkeypatch.setattr(decode_gemm, "sparse_min_rows",
                        lambda density: DENSE_ROWS if density >= decode_gemm.SPARSE_DENSE_MIN_DENSITY else ROWS)
    return decode_calls


@pytest.mark.parametrize("vendor,density,rows", [
    ("AuthenticAMD", 0.5, decode_gemm.SPARSE_MIN_ROWS), ("AuthenticAMD", 0.75, decode_gemm.SPARSE_DENSE_MIN_ROWS),
    ("", 0.5, decode_gemm.SPARSE_MIN_ROWS), ("GenuineIntel", 0.5, decode_gemm.INTEL_SPARSE_MIN_ROWS),
    ("GenuineIntel", 0.75, decode_gemm.INTEL_SPARSE_DENSE_MIN_ROWS)])
def test_intel_cpus_decode_sparse_layers_sooner(vendor, density, rows, monkeypatch):
    # Measured on an Intel Xeon (MKL's sgemm there is Intel's own): the route won from 384-512
    # rows, where on Zen 4 the kernels held it to 512-1024.
    monkeypatch.setattr(decode_gemm, "cpu_vendor", lambda: vendor)
    assert decode_gemm.sparse_min_rows(density) == rows
    x = torch.randn(rows, K)
    assert decode_gemm.sparse_applies(x, "auto", N * K, density)
    assert not decode_gemm.sparse_applies(x[:-1], "auto", N * K, density)
    assert not decode_gemm.sparse_applies(x, "auto", N * K, decode_gemm.SPARSE_MIN_DENSITY - 0.01)


def _nm(n, m, values="float32"):
    torch.manual_seed(0)
    w, b = torch.randn(N, K), torch.randn(N)
    return ts.nn.NMSparseLinear.from_dense(w, nm_keep(w, n, m), n, m, values, bias=b)


def _csr(sparsity, values="float32"):
    torch.manual_seed(0)
    w, b = torch.randn(N, K), torch.randn(N)
    return ts.nn.CSRSparseLinear.from_dense(w, torch.rand(N, K) >= sparsity, values, bias=b)


DECODED = [pytest.param(lambda: _nm(2, 4), id="2:4"), pytest.param(lambda: _nm(2, 4, "int8"), id="2:4-int8"),
           pytest.param(lambda: _nm(2, 4, "int4"), id="2:4-int4"),
           pytest.param(lambda: _nm(2, 4, "bfloat16"), id="2:4-bf16"), pytest.param(lambda: _nm(3, 4), id="3:4"),
           pytest.param(lambda: _nm(4, 8), id="4:8"), pytest.param(lambda: _csr(0.5), id="csr-50%"),
           pytest.param(lambda: _csr(0.3, "int8"), id="csr-30%-int8")]


@pytest.mark.parametrize("make", DECODED)
def test_large_batches_decode_and_match_the_kernel(make, decode_calls):
    layer = make()
    x = torch.randn(2, ROWS // 2, K)
    with torch.no_grad():
        got = layer(x)
        assert decode_calls == [ROWS]
        layer.backend = "native"  # the sparse kernel, for the same product
        kernel = layer(x)
    assert decode_calls == [ROWS]
    close_to_float64(got, layer.dense_weight(), x, layer.bias, "decoded")
    torch.testing.assert_close(got, kernel, rtol=1e-5, atol=1e-5)


def test_the_ops_decode_too(decode_calls):
    torch.manual_seed(1)
    w, b, x = torch.randn(N, K), torch.randn(N), torch.randn(ROWS, K)
    keep = nm_keep(w, 2, 4)
    v, i, s = S.nm_pack(w, keep, 2, 4)
    close_to_float64(S.nm_linear(x, v, i, s, b, 2, 4, K), w * keep, x, b, "nm_linear")
    cv, c, rp, cs = S.csr_pack(w, keep)
    close_to_float64(S.csr_linear(x, cv, c, rp, cs, b, K), w * keep, x, b, "csr_linear")
    assert decode_calls == [ROWS, ROWS]


def test_only_where_it_applies(decode_calls, monkeypatch):
    x = torch.randn(ROWS, K)
    with torch.no_grad():
        _nm(2, 4)(x[:-1])                      # half kept: one row short of ROWS
        _nm(3, 4)(x[:DENSE_ROWS - 1])          # 75% kept: one row short of DENSE_ROWS
        _nm(1, 4)(x)                           # a quarter kept: the kernel is ahead
        _csr(0.9)(x)                           # 10% kept
        native = _nm(2, 4)
        native.backend = "native"
        native(x)                              # an explicit backend is kept
        assert decode_calls == []
        _nm(3, 4)(x[:DENSE_ROWS])
        assert decode_calls == [DENSE_ROWS]
        monkeypatch.setattr(decode_gemm, "SMALL_WEIGHT", N * K - 1)
        _csr(0.5)(x)                           # a weight over SMALL_WEIGHT values
    assert decode_calls == [DENSE_ROWS]


def test_gradient_reaches_the_input(decode_calls):
    layer = _nm(2, 4)
    x = torch.randn(ROWS, K, requires_grad=True)
    layer(x).sum().backward()
    assert decode_calls == [ROWS]
    torch.testing.assert_close(x.grad, layer.dense_weight().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_malformed_storage_fails_on_the_decoded_path(decode_calls):
    x = torch.randn(ROWS, K)
    layer = _nm(2, 4)
    layer.indices[3, 0] = 0  # group 0 of row 3: positions 0, 0
    with pytest.raises(ValueError, match="positions must increase within a group; row 3, group 0"):
        layer(x)
    layer = _nm(2, 4)
    # The last index byte holds groups 16 and 17; group 17 covers columns 68-71 of K = 70.
    # Positions 0, 1 and 2, 3: the tail's first kept value moves to column 70.
    layer.indices[5, -1] = 0 | 1 << 2 | 2 << 4 | 3 << 6
    with pytest.raises(ValueError, match="row 5 stores a nonzero value at virtual column 70 >= in_features 70"):
        layer(x)
    layer = _csr(0.5)
    first = int(layer.row_ptr[2])
    layer.cols[first + 1] = layer.cols[first]
    with pytest.raises(ValueError, match="row 2 columns must be strictly increasing"):
        layer(x)
    assert decode_calls == [ROWS] * 3  # each took the decoded path and failed in its unpacker
