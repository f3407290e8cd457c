"""Decode-fused linear for the low-bit formats (FP8, NVFP4, MXFP4, N-bit integers, binary,
ternary): every backend against a float64 product with the exactly dequantized weight,
the LowBitLinear module, configs / presets, save / load, and the error paths."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim import ops
from tensorslim.formats import FORMATS, get_format

LINEAR_FORMATS = ["fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "int2", "uint2", "int3", "uint3", "int5",
                  "int6", "uint7", "int8", "uint4", "binary", "ternary"]


def quantized_weight(fmt, N, K, group, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    q, s, z, t = ops.quantize_lowbit(w, fmt, group)
    deq = ops.dequantize_lowbit(q, s, z, t, fmt, group, K, backend="reference")
    return (q, s, z, t), deq


def rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_every_backend_matches_float64(fmt, isa):
    spec = get_format(fmt)
    N = 40
    for K in (256, 96):
        for group in ([spec.block_size] if spec.block_size else [K, 32]):
            (q, s, z, t), deq = quantized_weight(fmt, N, K, group, seed=K + group)
            bias = torch.randn(N)
            for M in (1, 3, 8, 17):
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
                want = x.double() @ deq.double().T + bias.double()
                for backend in ("reference", "scalar", "native", "auto"):
                    if backend == "native" and isa == "scalar":
                        with pytest.raises(ValueError, match="no native kernel"):
                            ops.linear_lowbit(x, q, s, z, t, bias, fmt, group, K, backend=backend)
                        continue
                    y = ops.linear_lowbit(x, q, s, z, t, bias, fmt, group, K, backend=backend)
                    assert y.shape == (M, N) and y.dtype == torch.float32
                    assert rel_err(y, want) < 2e-6, (fmt, K, group, M, backend)


def test_large_batches_past_the_gemv(isa):
    # M > GEMV_MAX_ROWS takes the panel GEMM, or on the scalar path decode-then-sgemm,
    # SGEMM_TILE_ROWS weight rows at a time: N = 600 spans 3 tiles.
    assert ops.lowbit.SGEMM_TILE_ROWS < 600
    M = ops.lowbit.GEMV_MAX_ROWS + 3
    for fmt, group in (("mxfp4", 32), ("int3", 32)):
        (q, s, z, t), deq = quantized_weight(fmt, 600, 64, group, seed=5)
        x = torch.randn(M, 64)
        bias = torch.randn(600)
        y = ops.linear_lowbit(x, q, s, z, t, bias, fmt, group, 64)
        assert rel_err(y, x.double() @ deq.double().T + bias.double()) < 2e-6


@pytest.mark.parametrize("fmt,group", [("fp8_e4m3", 1024), ("nvfp4", 16), ("int3", 32)])
def test_large_weights_past_the_gemv_take_the_panel_gemm(isa, fmt, group):
    # Weights of more than 1M values (kPanelSmallWeight) keep the GEMV up to 8 rows (nvfp4 on
    # AVX-512: the activation pieces up to 32), then the panel GEMM: float64 on every side.
    (q, s, z, t), deq = quantized_weight(fmt, 1040, 1024, group, seed=3)
    want_w = deq.double().T
    for M in (8, 9, 33):
        x = torch.randn(M, 1024)
        y = ops.linear_lowbit(x, q, s, z, t, None, fmt, group, 1024)
        assert rel_err(y, x.double() @ want_w) < 2e-6, (fmt, M)


def test_batches_on_both_sides_of_the_isa_gemv_cap(isa):
    # The fused GEMV runs up to the cap, the panel GEMM (the scalar path: decode + sgemm)
    # above it: both sides give the float64 result.
    cap = ts._C.lowbit_gemv_max_rows()
    assert cap == ops.lowbit.GEMV_MAX_ROWS
    for fmt, group in (("nvfp4", 16), ("fp8_e4m3", 64), ("int3", 32)):
        (q, s, z, t), deq = quantized_weight(fmt, 44, 64, group, seed=7)
        for M in (cap, cap + 1):
            x = torch.randn(M, 64)
            y = ops.linear_lowbit(x, q, s, z, t, None, fmt, group, 64)
            assert rel_err(y, x.double() @ deq.double().T) < 2e-6, (fmt, M)


def test_shapes_the_native_kernel_does_not_take_fall_back(isa):
    # Groups of 12 start off AVX2's 8-value step and AVX-512's 16: "auto" uses the scalar path,
    # "native" says why it cannot. Groups of 8 fit AVX2 only. (Any K fits with one group per
    # row or whole-step groups: the short tail is decoded by the scalar reference.)
    step = {"avx2": 8, "avx512": 16}.get(ts._C.active_isa())
    for K, group in ((36, 12), (40, 8), (36, 36)):
        (q, s, z, t), deq = quantized_weight("fp8_e4m3", 8, K, group, seed=1)
        x = torch.randn(2, K)
        y = ops.linear_lowbit(x, q, s, z, t, None, "fp8_e4m3", group, K)
        assert rel_err(y, x.double() @ deq.double().T) < 2e-6
        if step is None:
            continue
        if group < K and group % step:
            with pytest.raises(ValueError, match=f"multiple of {step}"):
                ops.linear_lowbit(x, q, s, z, t, None, "fp8_e4m3", group, K, backend="native")
        else:
            y = ops.linear_lowbit(x, q, s, z, t, None, "fp8_e4m3", group, K, backend="native")
            assert rel_err(y, x.double() @ deq.double().T) < 2e-6


def test_bf16_activations_and_leading_dims():
    (q, s, z, t), deq = quantized_weight("nvfp4", 24, 64, 16, seed=2)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    y = ops.linear_lowbit(x, q, s, z, t, None, "nvfp4", 16, 64)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    want = F.linear(x.float(), deq)
    assert torch.allclose(y.float(), want, rtol=1e-2, atol=1e-2)


def test_linear_errors():
    (q, s, z, t), _ = quantized_weight("nvfp4", 8, 64, 16, seed=3)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="last dimension 64"):
        ops.linear_lowbit(torch.randn(2, 32), q, s, z, t, None, "nvfp4", 16, 64)
    with pytest.raises(ValueError, match="tensor_scale"):
        ops.linear_lowbit(x, q, s, z, None, None, "nvfp4", 16, 64)
    with pytest.raises(ValueError, match="bias"):
        ops.linear_lowbit(x, q, s, z, t, torch.zeros(7), "nvfp4", 16, 64)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.linear_lowbit(x, q, s, z, t, None, "nvfp4", 16, 64, backend="gpu")
    with pytest.raises(ValueError, match="per-tensor"):
        w = torch.randn(8, 64)
        q2, s2, _, _ = ops.quantize_lowbit(w, "fp8_e4m3", -1)
        ops.linear_lowbit(x, q2, s2, None, None, None, "fp8_e4m3", -1, 64)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "int3"])
def test_module_matches_dequantized_linear(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    mod = ts.LowBitLinear.from_linear(lin, fmt)
    x = torch.randn(5, 128)
    want = F.linear(x, mod.dequantized_weight(), lin.bias)
    assert torch.allclose(mod(x), want, rtol=1e-5, atol=1e-5)
    # The module holds only packed codes and scales: 4 bits -> ~1/8 of fp32, FP8 ~1/4.
    weight_bytes = sum(b.numel() * b.element_size() for n, b in mod.named_buffers() if n != "bias")
    bits = get_format(fmt).bits
    assert weight_bytes <= 128 * 48 * (bits / 8) * 1.13
    assert not any(p.requires_grad for p in mod.parameters())


PRESET_CASES = {"fp8": ("fp8_e4m3", 30.0), "fp8_e5m2": ("fp8_e5m2", 24.0), "nvfp4": ("nvfp4", 19.0),
                "mxfp4": ("mxfp4", 17.0)}


def sqnr(ref, got):
    return float(20 * torch.log10(ref.norm() / (ref - got).norm()))


@pytest.mark.parametrize("preset", sorted(PRESET_CASES))
def test_presets_quantize_a_model_and_round_trip_through_save_load(preset, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 10))
    x = torch.randn(16, 64)
    ref = model[0](x).detach()
    q = copy.deepcopy(model)
    report = ts.quantize(q, preset, progress=False)
    fmt, floor = PRESET_CASES[preset]
    assert [c.format for c in report.changed] == [f"{fmt} {'per-channel' if 'fp8' in fmt else 'g' + str(get_format(fmt).block_size)}"] * 3
    assert all(isinstance(q[i], ts.LowBitLinear) for i in (0, 2, 3))
    assert sqnr(ref, q[0](x)) > floor
    path = tmp_path / "m.slim.safetensors"
    ts.save(q, path)
    fresh = copy.deepcopy(model)
    ts.load(fresh, path)
    assert isinstance(fresh[0], ts.LowBitLinear) and torch.equal(fresh(x), q(x))
    assert "LowBitLinear" in str(ts.summary(fresh))


def test_configs_round_trip_and_validate():
    for cfg in (ts.FP8WeightOnly(fmt="e5m2", group_size=64), ts.NVFP4(), ts.MXFP4(backend="native")):
        assert ts.Config.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="e4m3"):
        ts.FP8WeightOnly(fmt="e3m4")
    with pytest.raises(ValueError, match="group_size"):
        ts.FP8WeightOnly(group_size=48)
    with pytest.raises(ValueError, match="backend"):
        ts.NVFP4(backend="onednn")


def test_layers_the_block_does_not_divide_get_a_short_last_block():
    # issue 15: no layer is skipped for its width (tests/python/test_partial_groups_lowbit.py)
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 8))
    report = ts.quantize(model, "nvfp4", progress=False)
    assert not report.skipped
    assert isinstance(model[0], ts.LowBitLinear) and model[0].scales.shape == (64, 3)


def test_nan_weights_fail_and_leave_the_model_unchanged():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        model[1].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"layer '1'.*row 3"):
        ts.quantize(model, "fp8", progress=False)
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], nn.Linear)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_int_weight_only_n_bits(bits):
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Linear(128, 64))
    x = torch.randn(4, 128)
    ref = model(x).detach()
    for sym in (True, False):
        q = copy.deepcopy(model)
        ts.quantize(q, ts.IntWeightOnly(bits=bits, group_size=32, symmetric=sym, skip_output_head=False),
                    progress=False)
        mod = q[0]
        assert isinstance(mod, ts.WeightOnlyLinear) and mod.fmt == f"{'int' if sym else 'uint'}{bits}"
        assert mod.qweight.shape == (64, 128 * bits // 8)
        y = q(x)
        assert torch.allclose(y, F.linear(x, mod.dequantized_weight(), model[0].bias), rtol=1e-5, atol=1e-5)
        # More bits, less error: uniform noise falls ~6 dB per bit.
        assert sqnr(ref, y) > 6.0 * bits - 10.0


def test_fake_linear_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 64)
        q = torch.empty(8, 32, dtype=torch.uint8)
        s = torch.empty(8, 4, dtype=torch.uint8)
        y = torch.ops.tensorslim.linear_lowbit(x, q, s, torch.empty(0, dtype=torch.uint8), torch.empty(1),
                                               None, "nvfp4", 16, 0)
        assert y.shape == (3, 8)


def test_every_table_row_has_a_linear_path():
    # Every row but the per-tensor-only case can back a LowBitLinear (FORMATS is the table).
    for name, spec in FORMATS.items():
        group = spec.block_size or 32
        mod = ts.LowBitLinear(64, 16, name, group, bias=False)
        assert mod(torch.zeros(1, 64)).shape == (1, 16)


@pytest.mark.parametrize("fmt,M", [("nvfp4", 1), ("mxfp4", 1), ("nvfp4", 5)])
def test_fp4_activation_pieces_and_float_kernels_both_match_float64(fmt, M):
    # NVFP4 / MXFP4 at a few rows on AVX-512 VNNI multiply the codes as integers with the
    # activations as three int8 pieces (src/cpu/activation_pieces.h); the switch runs the E2M1
    # float GEMV instead. Both within float32 accumulation of the float64 product; where the
    # pieces run they are a different kernel.
    if ts._C.active_isa() == "scalar":
        pytest.skip("no vector kernels")
    K, N, group = 2048, 72, get_format(fmt).block_size
    (q, s, z, t), deq = quantized_weight(fmt, N, K, group, seed=3)
    x = torch.randn(M, K) * torch.logspace(-2, 2, K)  # a wide range within each row
    want = x.double() @ deq.double().T
    outs = []
    try:
        for pieces in (True, False):
            ts._C.set_activation_pieces_enabled(pieces)
            y = ops.linear_lowbit(x, q, s, z, t, None, fmt, group, K)
            assert rel_err(y, want) < 1e-5, pieces
            outs.append(y)
    finally:
        ts._C.set_activation_pieces_enabled(True)
    if ts._C.active_isa() == "avx512" and ops.w4a8.kernel_name(K, 128) == "avx512_vnni":
        assert not torch.equal(outs[0], outs[1])
