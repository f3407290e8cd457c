"""Rows whose length is not a multiple of the block / group (issue 15): ceil(K / group) groups,
the last one short, for the low-bit formats (FP8, NVFP4, MXFP4, N-bit integers) and W4A8. The
native ops against the plain-PyTorch references bit for bit, the short group's scale from its
own values, models with widths 576 / 100 / 1000 quantized without a skipped layer, save / load,
summaries and QAT."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim import ops
from tensorslim.formats import get_format
from tensorslim.ops import lowbit as L

WIDTHS = (100, 200, 1000, 10)  # 10: shorter than any group
# (format, group) pairs: the block formats' blocks, FP8 and N-bit integers in groups.
CASES = [("nvfp4", 16), ("mxfp4", 32), ("fp8_e4m3", 32), ("fp8_e5m2", 128), ("int3", 32),
         ("uint3", 64), ("int5", 128), ("int6", 32), ("uint5", 32), ("int2", 64), ("int7", 128),
         ("binary", 32), ("ternary", 64)]


def _w(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, ::37] *= 6  # a few large weights, as trained layers have
    return w


def _same(a, b):
    return a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("cols", WIDTHS)
def test_native_quantize_matches_the_reference_and_the_short_group_stands_alone(fmt, group, cols, isa):
    w = _w(6, cols, seed=cols)
    got = ops.quantize_lowbit(w, fmt, group)
    want = ops.quantize_lowbit(w, fmt, group, backend="reference")
    assert got[1].shape == (6, -(-cols // group))
    for a, b in zip(got, want):
        assert _same(a, b), fmt
    deq = ops.dequantize_lowbit(*got, fmt, group, cols)
    assert torch.equal(deq, ops.dequantize_lowbit(*got, fmt, group, cols, backend="reference"))
    # The short group quantized on its own (NVFP4 shares the tensor scale: checked by its rule).
    start = (got[1].shape[1] - 1) * group
    tail = w[:, start:]
    if fmt == "nvfp4":
        amax = tail.abs().amax(1)
        assert torch.equal(got[1][:, -1], L.e4m3_encode(amax / 6 / got[3]).to(torch.uint8))
        return
    g_alone = group if get_format(fmt).block_size else tail.shape[1]
    alone = ops.quantize_lowbit(tail, fmt, g_alone)
    assert torch.equal(got[1][:, -1:], alone[1])
    if alone[2] is not None:
        assert torch.equal(got[2][:, -1:], alone[2])
    assert torch.equal(deq[:, start:], ops.dequantize_lowbit(*alone, fmt, g_alone, tail.shape[1]))


@pytest.mark.parametrize("fmt,group", CASES)
def test_linear_on_every_isa_matches_float64(fmt, group, isa):
    for cols in WIDTHS:
        w = _w(9, cols, seed=3)
        q, s, z, t = ops.quantize_lowbit(w, fmt, group)
        deq = ops.dequantize_lowbit(q, s, z, t, fmt, group, cols, backend="reference").double()
        bias = torch.randn(9)
        for M in (1, 3, 8, 17):
            x = torch.randn(M, cols)
            want = x.double() @ deq.T + bias.double()
            mag = x.double().abs() @ deq.abs().T + bias.double().abs()
            backends = ("auto", "scalar") if isa == "scalar" else ("auto", "native")
            for backend in backends:
                y = ops.linear_lowbit(x, q, s, z, t, bias, fmt, group, cols, backend=backend)
                assert ((y.double() - want).abs() <= 1e-6 * mag + 1e-30).all(), (fmt, cols, M, backend)


def test_the_native_kernels_take_short_groups():
    if ts._C.best_isa() == "scalar":
        pytest.skip("no AVX2")
    w = _w(4, 100)
    for fmt, group in (("nvfp4", 16), ("mxfp4", 32), ("int3", 64), ("fp8_e4m3", 100)):
        q, s, z, t = ops.quantize_lowbit(w, fmt, group)
        ops.linear_lowbit(torch.randn(2, 100), q, s, z, t, None, fmt, group, 100, backend="native")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8_e4m3"])
def test_given_scales_pack_like_quantize_on_short_blocks(fmt):
    w = _w(5, 100, seed=4)
    group = get_format(fmt).block_size or 32
    q, s, _, t = ops.quantize_lowbit(w, fmt, group)
    assert torch.equal(L.quantize_lowbit_with_scales(w, fmt, s, t, group), q)


def test_bad_group_sizes_still_raise():
    w = _w(4, 100)
    for fmt, group, match in (("nvfp4", 32, "blocks of 16"), ("int3", 0, "group_size"),
                              ("int3", -4, "group_size"), ("int3", 10, "whole number of bytes")):
        with pytest.raises(ValueError, match=match):
            ops.quantize_lowbit(w, fmt, group)
    with pytest.raises(ValueError, match="even positive"):
        ops.w4a8.check_group_size(100, 33)
    with pytest.raises(ValueError, match="scales"):  # 6 block scales where a row has 7
        q, s, _, t = ops.quantize_lowbit(w, "nvfp4", 16)
        ops.dequantize_lowbit(q, s[:, :6].contiguous(), None, t, "nvfp4", 16, 100)


def test_cuda_tensors_with_a_short_group_take_the_reference():
    assert L.short_last_group(16, 100) and L.short_last_group(128, 100)
    assert not L.short_last_group(16, 96) and not L.short_last_group(100, 100)
    assert not L.short_last_group(-1, 100)


# ---------------------------------------------------------------- W4A8


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
@pytest.mark.parametrize("K,group", [(576, 128), (100, 64), (1000, 128), (100, 128)])
def test_w4a8_every_backend_is_bit_exact_with_the_specification(fmt, K, group, isa):
    w = _w(21, K, seed=K)
    q, s, z, _ = ops.quantize_lowbit(w, fmt, group)
    assert s.shape == (21, -(-K // group))
    bias = torch.randn(21)
    for M in (1, 3, 8, 17):
        x = torch.randn(M, K) * 3
        want = ops.linear_w4a8(x, q, s, z, bias, fmt, group, K, backend="reference")
        for backend in ("auto", "scalar") + (("native",) if isa != "scalar" else ()):
            got = ops.linear_w4a8(x, q, s, z, bias, fmt, group, K, backend=backend)
            assert torch.equal(got, want), (backend, M)
    if isa != "scalar":
        assert ops.w4a8.kernel_name(K, group) != "reference"


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_w4a8_weights_are_the_weight_only_bytes_on_full_groups(fmt):
    w = _w(8, 256, seed=2)
    assert all(_same(a, b) for a, b in zip(ops.quantize_lowbit(w, fmt, 64)[:3], ops.quantize(w, fmt, 64)))


# ---------------------------------------------------------------- models


class _Widths(nn.Module):
    """Linear layers whose widths no group of 16 / 32 / 128 divides: 576, 100, 1000."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(576, 100)
        self.b = nn.Linear(100, 1000)
        self.c = nn.Linear(1000, 576)
        self.head = nn.Linear(576, 10)

    def forward(self, x):
        return self.head(self.c(torch.relu(self.b(torch.relu(self.a(x))))))


def _dense_reference(model, x):
    """The model run with every compressed layer's dequantized weight through F.linear."""
    def run(mod, h):
        w = mod.dequantized_weight() if hasattr(mod, "dequantized_weight") else mod.weight
        return torch.nn.functional.linear(h, w, mod.bias)
    h = torch.relu(run(model.b, torch.relu(run(model.a, x))))
    return run(model.head, run(model.c, h))


@pytest.mark.parametrize("config", ["nvfp4", "mxfp4", "fp8", ts.FP8WeightOnly(group_size=128),
                                    ts.W4A8(group_size=128), ts.W4A8(group_size=64, symmetric=False)],
                         ids=["nvfp4", "mxfp4", "fp8", "fp8_g128", "w4a8_g128", "w4a8_uint4_g64"])
def test_every_layer_of_a_model_is_quantized_and_round_trips(config, tmp_path):
    cfg = ts.config.resolve_config(config) if isinstance(config, str) else config
    cfg = dataclasses.replace(cfg, skip_output_head=False)
    model = _Widths()
    x = torch.randn(5, 576)
    ref = model(x).detach()
    report = ts.quantize(model, cfg, progress=False)
    assert not report.skipped and len(report.changed) == 4
    kind = ts.W4A8Linear if isinstance(cfg, ts.W4A8) else ts.LowBitLinear
    assert all(isinstance(m, kind) for m in (model.a, model.b, model.c, model.head))
    group = model.a.group_size
    assert model.b.scales.shape == (1000, -(-100 // group))
    with torch.no_grad():
        y = model(x)
        want = _dense_reference(model, x)
    # W4A8 also quantizes the activations: compare it to the float model loosely.
    if kind is ts.LowBitLinear:
        assert (y - want).abs().max() <= 1e-4 * want.abs().max()
    assert float((y - ref).norm() / ref.norm()) < 0.5  # four 4-bit layers in a row
    # summary bytes: the buffers with ceil(K / group) scales
    entry = {c.name: c for c in report.changed}["b"]
    assert entry.bytes_after == sum(t.numel() * t.element_size() for t in model.b.state_dict().values())
    path = tmp_path / "m.slim.safetensors"
    ts.save(model, path)
    fresh = ts.load(_Widths(), path)
    for key, t in model.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("fmt", ["int3", "uint5", "int6"])
def test_n_bit_integer_layers_take_short_groups(fmt):
    lin = nn.Linear(100, 24)
    mod = ts.LowBitLinear.from_linear(lin, fmt, 32)
    assert mod.scales.shape == (24, 4)
    x = torch.randn(3, 100)
    want = torch.nn.functional.linear(x.double(), mod.dequantized_weight().double(), lin.bias.double())
    with torch.no_grad():
        assert (mod(x).double() - want).abs().max() < 1e-5
        assert float((mod(x) - lin(x)).norm() / lin(x).norm()) < 0.3


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("learnable", [False, True])
def test_qat_on_width_100(fmt, learnable):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(100, 40), nn.ReLU(), nn.Linear(40, 8))
    cfg = ts.config.resolve_config(fmt)
    cfg = dataclasses.replace(cfg, skip_output_head=False)
    report = ts.prepare_qat(model, cfg, learnable_scales=learnable, progress=False)
    assert not report.skipped and len(report.changed) == 2
    x = torch.randn(16, 100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fq = [model[i].fake_quantized_weight().detach() for i in (0, 2)]
    with torch.no_grad():
        y_fake = model(x)
    ts.convert(model)
    assert isinstance(model[0], ts.LowBitLinear) and model[0].scales.shape[1] == -(-100 // model[0].group_size)
    for i, w in zip((0, 2), fq):
        assert torch.equal(model[i].dequantized_weight(), w), i
    with torch.no_grad():
        assert (model(x) - y_fake).abs().max() <= 1e-5 * y_fake.abs().max()


def test_failed_quantize_leaves_the_model_unchanged():
    model = _Widths()
    with torch.no_grad():
        model.c.weight[2, 999] = float("nan")  # in the short last block
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer 'c'.*row 2"):
        ts.quantize(model, "nvfp4", progress=False)
    assert all(isinstance(m, nn.Linear) for m in (model.a, model.b, model.c))
    for k, t in model.state_dict().items():
        assert torch.allclose(t, before[k], equal_nan=True), k
