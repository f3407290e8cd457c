"""The native kernels against the plain-PyTorch reference: bit for bit for encodings."""
import os
import subprocess
import sys

import pytest
import torch

import tensorslim as ts
from tensorslim import ops
from tensorslim.formats import get_format
from conftest import skip_without_onednn

FORMATS = ["int8", "uint8", "int4", "uint4"]


def _granularities(cols):
    gs = [ts.PER_TENSOR, cols]
    return gs + [g for g in (32, 64, 128, 256) if cols % g == 0]


def _data(rows, cols, seed, asym):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[:, ::37] *= 8  # outliers
    return x * 0.5 + 0.7 if asym else x


def _assert_same_quantization(x, fmt, group):
    q, s, z = ops.quantize(x, fmt, group)
    rq, rs, rz = ops.quantize(x, fmt, group, backend="reference")
    assert q.dtype == rq.dtype and torch.equal(q, rq), (fmt, group)
    assert torch.equal(s, rs), (fmt, group)
    assert (z is None) == (rz is None) and (z is None or torch.equal(z, rz))
    cols = x.shape[1]
    d = ops.dequantize(q, s, z, fmt, group, cols)
    rd = ops.dequantize(rq, rs, rz, fmt, group, cols, backend="reference")
    assert torch.equal(d, rd), (fmt, group)
    return q, s, z, d


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 256), (7, 96), (5, 37), (33, 512)])
def test_quantize_matches_reference_on_every_isa(isa, fmt, shape):
    rows, cols = shape
    x = _data(rows, cols, rows * cols, fmt.startswith("u"))
    for group in _granularities(cols):
        _, s, _, d = _assert_same_quantization(x, fmt, group)
        # Round to nearest: every value lands within half a step of where it started.
        step = s.expand(rows, -1).repeat_interleave(cols // s.shape[1], 1) if s.shape[1] > 1 else s.expand(rows, 1)
        assert torch.all((d - x).abs() <= 0.5001 * step)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["int8", "uint4"])
def test_half_inputs_and_strided_views(isa, fmt, dtype):
    wide = _data(9, 300, 3, fmt.startswith("u")).to(dtype)
    x = wide[:, :256]  # rows strided by 300
    assert not x.is_contiguous()
    _assert_same_quantization(x, fmt, 64)
    _assert_same_quantization(wide.t()[:128, :9], fmt, 9)  # column stride != 1
    q, s, _ = ops.quantize(x, fmt, 64)
    q2, s2, _ = ops.quantize(x.float().contiguous(), fmt, 64)
    assert torch.equal(q, q2) and torch.equal(s, s2)  # half widens exactly


def test_int4_packs_low_nibble_first():
    x = torch.tensor([[1.0, -2.0, 7.0, 3.0, -8.0]])  # amax 8 -> scale 8/7
    q, s, _ = ops.quantize(x, "int4", 5)
    codes = torch.round(x / s).clamp(-8, 7).to(torch.int32)
    expect = [(codes[0, 0] & 0xF) | ((codes[0, 1] & 0xF) << 4),
              (codes[0, 2] & 0xF) | ((codes[0, 3] & 0xF) << 4),
              codes[0, 4] & 0xF]
    assert q.tolist() == [[int(v) for v in expect]]
    assert float(s) == pytest.approx(8 / 7)


def test_round_half_to_even():
    # scale = 127/127 = 1 for amax 127: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q, s, _ = ops.quantize(x, "int8", 6)
    assert float(s) == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_non_finite_input_raises(bad, backend):
    x = torch.ones(4, 64)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="row 2"):
        ops.quantize(x, "int8", 32, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_tensors(backend):
    q, s, z = ops.quantize(torch.empty(0, 64), "uint4", 32, backend=backend)
    assert q.shape == (0, 32) and s.shape == (0, 2) and z.shape == (0, 2)
    q, s, _ = ops.quantize(torch.empty(0, 64), "int8", ts.PER_TENSOR, backend=backend)
    assert q.shape == (0, 64) and s.tolist() == [[1.0]]
    q, s, _ = ops.quantize(torch.empty(3, 0), "int8", 0, backend=backend)
    assert q.shape == (3, 0) and s.tolist() == [[1.0]] * 3
    # Rows of length 0 with a group size: no groups (this once divided by zero in the core).
    for fmt in ("int8", "uint4", "int4"):
        q, s, z = ops.quantize(torch.empty(3, 0), fmt, 32, backend=backend)
        assert q.shape == (3, 0) and s.shape == (3, 0)
        assert ops.dequantize(q, s, z, fmt, 32, 0, backend=backend).shape == (3, 0)


def test_dequantize_cols_checked_before_allocating():
    """cols = -1 raised torch's 'negative dimension'; 2^40 tried a 17 TB allocation."""
    q, s, z = ops.quantize(torch.randn(3, 64), "uint4", 32)
    for fn, args in ((ops.dequantize, (q, s, z, "uint4", 32)), (ops.dequantize_lowbit, (q, s, z, None, "uint4", 32))):
        for cols in (-1, 2 ** 40, 63 * 2):
            with pytest.raises(ValueError, match="cols|pack into"):
                fn(*args, cols)
        assert fn(*args, 64).shape == (3, 64)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 96)
    for bad in (0, -2):  # 64 (two groups, the last of 32) is fine; these are not
        with pytest.raises(ValueError, match="positive number of values per group"):
            ops.quantize(x, "int4", bad)
    with pytest.raises(ValueError, match="must be even"):
        ops.quantize(x, "int4", 33)
    with pytest.raises(ValueError, match="unknown format"):
        ops.quantize(x, "int9", 32)
    with pytest.raises(ValueError, match="use ops.quantize_lowbit"):
        ops.quantize(x, "fp8_e4m3", 32)
    with pytest.raises(TypeError, match="float32"):
        ops.quantize(x.to(torch.int32), "int8", 32)
    with pytest.raises(ValueError, match="2-D"):
        ops.quantize(x.reshape(2, 2, 96), "int8", 32)
    with pytest.raises(ValueError, match="backend"):
        ops.quantize(x, "int8", 32, backend="fast")
    q, s, _ = ops.quantize(torch.randn(8, 64), "int8", 32)
    with pytest.raises(ValueError, match="last dimension 64"):
        ops.linear_weight_only(torch.randn(2, 32), q, s, None, None, "int8", 32, 64)


def _float64_linear(x, q, s, z, bias, fmt, group, K):
    w = ops.dequantize(q, s, z, fmt, group, K).double()
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", ["auto", "native", "onednn", "reference"])
def test_linear_weight_only_matches_float64(fmt, backend):
    K, N = 256, 96
    w = _data(N, K, 1, False)
    bias = torch.randn(N)
    for group in (K, 32, 128):
        q, s, z = ops.quantize(w, fmt, group)
        for M in (1, 4, 8, 19):
            x = torch.randn(M, K)
            if backend == "native" and ts._C.active_isa() == "scalar":  # AVX2 and up
                with pytest.raises(ValueError, match="no native kernel"):
                    ops.linear_weight_only(x, q, s, z, bias, fmt, group, K, backend=backend)
                continue
            if backend == "onednn" and not ts._C.built_with_onednn():
                with pytest.raises(ValueError, match="'onednn' is not available"):
                    ops.linear_weight_only(x, q, s, z, bias, fmt, group, K, backend=backend)
                continue
            y = ops.linear_weight_only(x, q, s, z, bias, fmt, group, K, backend=backend)
            ref = _float64_linear(x, q, s, z, bias, fmt, group, K)
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, (fmt, group, M, backend, err)


@pytest.mark.parametrize("fmt,M", [("int4", 1), ("uint4", 1), ("int4", 3), ("int8", 2), ("uint8", 8),
                                   ("int4", 32), ("int8", 13)])
def test_activation_pieces_and_float_kernels_both_match_float64(fmt, M):
    # Integer weight-only at a few rows multiplies the codes with the activations as three int8
    # pieces (src/cpu/activation_pieces.h: INT4 at batch 1 on AVX2 and AVX-512 VNNI, more rows
    # by CPU kind, INT8 on AVX-512 VNNI only); the switch runs the float kernels instead (past 8
    # rows the panel GEMM). Both stay within float32 accumulation of the float64 product, and
    # where the pieces run they are a different kernel.
    if ts._C.active_isa() == "scalar":
        pytest.skip("no vector kernels")
    K, N = 2048, 64
    w = _data(N, K, 3, fmt.startswith("u"))
    q, s, z = ops.quantize(w, fmt, 128)
    x = torch.randn(M, K) * torch.logspace(-2, 2, K)  # a wide range within each row
    ref = _float64_linear(x, q, s, z, None, fmt, 128, K)
    outs = []
    try:
        for pieces in (True, False):
            ts._C.set_activation_pieces_enabled(pieces)
            y = ops.linear_weight_only(x, q, s, z, None, fmt, 128, K, backend="native")
            assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5, pieces
            outs.append(y)
    finally:
        ts._C.set_activation_pieces_enabled(True)
    # Where the pieces take M rows on this CPU they are a different kernel; the rows differ by
    # CPU kind (Zen 4's AVX-512: INT4 1-32, INT8 2-32; Zen 5's: INT4 1-8, INT8 9-16).
    lo, hi = ts._C.pieces_rows(get_format(fmt).id)
    if ts._C.active_isa() == "avx512" and ops.w4a8.kernel_name(K, 128) == "avx512_vnni":
        assert (lo, hi) in (((1, 32), (1, 8)) if fmt.endswith("int4") else ((2, 32), (9, 16)))
    elif fmt.endswith("int4") and ts._C.active_isa() == "avx2":
        assert lo == 1 and hi >= 1
    if lo <= M <= hi:
        assert not torch.equal(outs[0], outs[1])


def test_linear_bf16_and_batched_inputs():
    K, N = 128, 64
    q, s, z = ops.quantize(torch.randn(N, K), "uint4", 32)
    x = torch.randn(2, 3, K)
    # fp16 runs in fp32 on the CPU and is rounded once at the end (2^-11 relative).
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        y = ops.linear_weight_only(x.to(dtype), q, s, z, None, "uint4", 32, K)
        assert y.shape == (2, 3, N) and y.dtype == dtype
        ref = _float64_linear(x.to(dtype).reshape(6, K), q, s, z, None, "uint4", 32, K).reshape(2, 3, N)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol


def test_ops_work_on_meta_tensors_and_pass_opcheck():
    x = torch.empty(6, 256, device="meta")
    q, s, z = ops.quantize(x, "uint4", 128)
    assert q.shape == (6, 128) and q.device.type == "meta" and s.shape == z.shape == (6, 2)
    y = ops.linear_weight_only(torch.empty(3, 256, device="meta"), q, s, z, None, "uint4", 128, 256)
    assert y.shape == (3, 6)
    w = torch.randn(16, 64)
    q, s, _ = ops.quantize(w, "int8", 32)
    torch.library.opcheck(torch.ops.tensorslim.quantize.default, (w, "int8", 32))
    torch.library.opcheck(torch.ops.tensorslim.linear_weight_only.default,
                          (torch.randn(2, 64), q, s, None, None, "int8", 32, 0))


@pytest.mark.parametrize("fmt", ["int8", "uint4"])
def test_auto_takes_onednn_sooner_where_it_runs_amx(fmt):
    """Where oneDNN's weight-decompression matmul runs AMX tiles, `auto` takes it from 16 rows of
    bf16 activations (any weight) and from 128 (8-bit) / 256 (4-bit) rows of fp32 ones on a weight
    of more than 2^20 values; elsewhere (and capped at AVX2) our kernels up to 1024 rows.
    Bit-for-bit the backend chosen, within bf16 / fp32 rounding of the float64 product."""
    skip_without_onednn()
    amx = ts._C.onednn_weight_only_uses_amx() and ts._C.active_isa() == "avx512"
    if ts._C.active_isa() == "scalar":
        pytest.skip("no native kernels")
    torch.manual_seed(3)
    for K, N, dtype, rows in ((384, 256, torch.bfloat16, (8, 15, 16, 40)),
                              (1152, 1024, torch.float32, (64, 127, 128, 255, 256))):
        q, s, z = ops.quantize(torch.randn(N, K), fmt, 128)
        for M in rows:
            x = torch.randn(M, K).to(dtype)
            auto = ops.linear_weight_only(x, q, s, z, None, fmt, 128, K, backend="auto")
            oned = M >= (16 if dtype == torch.bfloat16 else 256 if fmt == "uint4" else 128) and amx
            want = ops.linear_weight_only(x, q, s, z, None, fmt, 128, K, backend="onednn" if oned else "native")
            assert auto.dtype == dtype and torch.equal(auto, want), (K, N, M, oned)
            ref = _float64_linear(x.float(), q, s, z, None, fmt, 128, K)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 output rounding, fp32 accumulation
            assert float((auto.double() - ref).abs().max() / ref.abs().max()) < tol, (K, N, M)
    if fmt == "uint4":  # an odd K oneDNN cannot address in 4-bit rows: ours at every row count
        q, s, z = ops.quantize(torch.randn(64, 385), fmt, 385)
        x = torch.randn(32, 385).to(torch.bfloat16)
        want = ops.linear_weight_only(x, q, s, z, None, fmt, 385, 385, backend="native")
        assert torch.equal(ops.linear_weight_only(x, q, s, z, None, fmt, 385, 385, backend="auto"), want)
        with pytest.raises(ValueError, match="oneDNN has no implementation"):
            ops.linear_weight_only(x, q, s, z, None, fmt, 385, 385, backend="onednn")


def test_onednn_runs_an_optimized_implementation():
    """ONEDNN_VERBOSE names the implementation that ran: it must not be a `ref` one."""
    skip_without_onednn()
    code = (
        "import torch, tensorslim as ts\n"
        "q, s, z = ts.ops.quantize(torch.randn(256, 512), 'int4', 128)\n"
        "ts.ops.linear_weight_only(torch.randn(32, 512), q, s, z, None, 'int4', 128, 512, backend='onednn')\n"
        "q, s, z = ts.ops.quantize(torch.randn(256, 512), 'int8', 512)\n"
        "ts.ops.linear_weight_only(torch.randn(32, 512), q, s, z, None, 'int8', 512, 512, backend='onednn')\n"
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    execs = [line.split(",") for line in out.splitlines() if ",primitive,exec," in line and ",matmul," in line]
    assert len(execs) == 2, out
    for fields in execs:
        impl = fields[fields.index("matmul") + 1]
        assert not impl.startswith("ref"), impl
        assert "wei:s4" in ",".join(fields) or "wei:s8" in ",".join(fields)


@pytest.mark.parametrize("fmt", ["int3", "uint2", "int6"])
def test_other_integer_widths_run_the_low_bit_kernels(fmt):
    torch.manual_seed(0)
    w, x = torch.randn(48, 256), torch.randn(5, 256)
    q, s, z = ops.quantize(w, fmt, 128)
    q2, s2, z2, t2 = ops.quantize_lowbit(w, fmt, 128)
    assert t2 is None and torch.equal(q, q2) and torch.equal(s, s2)
    assert (z is None) == (z2 is None) and (z is None or torch.equal(z, z2))
    deq = ops.dequantize(q, s, z, fmt, 128, 256)
    assert torch.equal(deq, ops.dequantize_lowbit(q, s, z, None, fmt, 128, 256))
    for backend in ("auto", "onednn", "reference"):  # onednn: the fastest low-bit path
        y = ops.linear_weight_only(x, q, s, z, None, fmt, 128, 256, backend=backend)
        ref = x.double() @ deq.double().T
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
