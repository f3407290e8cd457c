"""Integer weight-only layers whose width the group size does not divide (issue 15): a
hidden width of 576, 100 or 1000 with group_size 128 gets ceil(K / 128) groups, the last one
short, instead of being skipped. RTN, AWQ and GPTQ; kernels against the references; save /
load; QAT; the CUDA routing (run on CPU tensors); bad group sizes."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim import ops
from tensorslim.formats import get_format, num_groups
from tensorslim.ops import calibration as C
from tensorslim.ops import weight_only as wo

WIDTHS = (576, 100, 1000)


def _model(seed=0):
    """Causal-LM-like widths: 576 -> 1000 -> 576 -> 100 -> 576, every layer a multiple of
    nothing useful; the reader of each width is quantized."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(576, 1000), nn.GELU(), nn.Linear(1000, 576), nn.GELU(),
                         nn.Linear(576, 100), nn.GELU(), nn.Linear(100, 576))


def _calib(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 32, 576, generator=gen) for _ in range(n)]


def _sqnr_db(ref, got):
    return float(20 * torch.log10(ref.norm() / (ref - got).norm()))


def _check_all_quantized(model, report, group, fmt):
    assert not report.skipped, [(c.name, c.reason) for c in report.skipped]
    layers = [m for m in model if not isinstance(m, nn.GELU)]
    assert all(isinstance(m, ts.WeightOnlyLinear) for m in layers)
    for m in layers:
        assert m.fmt == fmt
        assert m.scales.shape == (m.out_features, num_groups(m.in_features, group))
    return layers


CONFIGS = [
    (ts.Int4WeightOnly(group_size=128), "int4", 128),
    (ts.Int4WeightOnly(group_size=64, symmetric=False), "uint4", 64),
    (ts.Int8WeightOnly(group_size=128), "int8", 128),
    (ts.Int8WeightOnly(group_size=256, symmetric=False), "uint8", 256),
    (ts.IntWeightOnly(bits=8, group_size=32), "int8", 32),
    (ts.IntWeightOnly(bits=4, group_size=256, symmetric=False), "uint4", 256),
]


@pytest.mark.parametrize("cfg,fmt,group", CONFIGS)
def test_rtn_quantizes_every_width_and_matches_the_dequantized_reference(cfg, fmt, group):
    model = _model()
    ref = copy.deepcopy(model)
    report = ts.quantize(model, cfg, progress=False)
    layers = _check_all_quantized(model, report, group, fmt)
    floor = 17.0 if get_format(fmt).bits == 4 else 40.0
    for m, r in zip(layers, [l for l in ref if isinstance(l, nn.Linear)]):
        w = m.dequantized_weight()
        assert _sqnr_db(r.weight.detach(), w) > floor
        # the whole-group part alone quantizes to the same values (the last group stands alone)
        whole = (m.in_features // group) * group
        if whole:
            q, s, z = ops.quantize(r.weight.detach()[:, :whole], fmt, group)
            assert torch.equal(ops.dequantize(q, s, z, fmt, group, whole), w[:, :whole])
        for M in (1, 5, 17):  # native GEMV, and past its batch limit where oneDNN declines
            x = torch.randn(M, m.in_features)
            with torch.no_grad():
                y = m(x)
            want = nn.functional.linear(x.double(), w.double(), r.bias.double())
            torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
            ref_y = ops.linear_weight_only(x, m.qweight, m.scales, m.zero_points, m.bias, fmt,
                                           group, m.in_features, backend="reference")
            torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 576)
    with torch.no_grad():
        assert _sqnr_db(ref(x), model(x)) > (10.0 if get_format(fmt).bits == 4 else 30.0)


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("cols,group", [(100, 128), (576, 128), (1000, 128), (200, 32), (101, 32)])
def test_native_ops_match_the_plain_pytorch_reference_bit_for_bit(fmt, cols, group, isa):
    x = torch.randn(7, cols, generator=torch.Generator().manual_seed(cols))
    x[:, ::37] *= 8
    q, s, z = ops.quantize(x, fmt, group)
    qr, sr, zr = ops.quantize(x, fmt, group, backend="reference")
    assert s.shape == (7, num_groups(cols, group))
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert (z is None and zr is None) or torch.equal(z, zr)
    d = ops.dequantize(q, s, z, fmt, group, cols)
    assert torch.equal(d, ops.dequantize(q, s, z, fmt, group, cols, backend="reference"))
    # the last group's scale is that of its values alone
    start = (num_groups(cols, group) - 1) * group
    _, s_last, _ = ops.quantize(x[:, start:], fmt, cols - start)
    assert torch.equal(s[:, -1:], s_last)


@pytest.mark.parametrize("fmt", ["int4", "uint4", "int8"])
@pytest.mark.parametrize("cols,group", [(4224, 4096), (640, 512)])
def test_layers_with_a_short_last_group_of_whole_blocks(fmt, cols, group, isa):
    """K a multiple of 128 but not of the group: the activation-pieces kernels (batch 1 on
    every ISA, 2-4 rows on AVX-512) left the short last group out of their sums (30-67% error)
    and now leave such layers to the float kernels, which match the float64 product."""
    torch.manual_seed(cols + group)
    lin = nn.Linear(cols, 24)
    layer = ts.WeightOnlyLinear.from_linear(lin, fmt, group)
    w = ops.dequantize(layer.qweight, layer.scales, layer.zero_points, fmt, group, cols).double()
    for rows in (1, 2, 4):
        x = torch.randn(rows, cols)
        want = x.double() @ w.T + lin.bias.double()
        with torch.no_grad():
            got = layer(x).double()
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5, rows


def test_full_group_sqnr_is_kept():
    """A short last group costs no accuracy: SQNR of a 576-wide weight in g128 is within
    0.5 dB of the 512-wide (whole groups) part of it."""
    w = torch.randn(256, 576, generator=torch.Generator().manual_seed(3))
    for fmt in ("int4", "uint4", "int8"):
        q, s, z = ops.quantize(w, fmt, 128)
        full = _sqnr_db(w, ops.dequantize(q, s, z, fmt, 128, 576))
        q5, s5, z5 = ops.quantize(w[:, :512], fmt, 128)
        part = _sqnr_db(w[:, :512], ops.dequantize(q5, s5, z5, fmt, 128, 512))
        assert full > part - 0.5, (fmt, full, part)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_quantizes_every_width(symmetric):
    model = _model(1)
    ref = copy.deepcopy(model)
    cfg = ts.Int4WeightOnly(group_size=128, symmetric=symmetric, algorithm="awq")
    report = ts.quantize(model, cfg, calib_data=_calib(), progress=False)
    _check_all_quantized(model, report, 128, "int4" if symmetric else "uint4")
    x = torch.cat([c.reshape(-1, 576) for c in _calib(2, seed=9)])
    with torch.no_grad():
        assert _sqnr_db(ref(x), model(x)) > 10.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_quantizes_every_width_with_the_cores_codes(symmetric):
    model = _model(2)
    ref = copy.deepcopy(model)
    calib = _calib()
    cfg = ts.Int4WeightOnly(group_size=128, symmetric=symmetric, algorithm="gptq")
    report = ts.quantize(model, cfg, calib_data=calib, progress=False)
    _check_all_quantized(model, report, 128, "int4" if symmetric else "uint4")
    # the first layer sees the calibration data itself: its codes are the core's for that H
    x = torch.cat([c.reshape(-1, 576) for c in calib]).double()
    h = (2 * x.T @ x / x.shape[0]).float()  # the pipeline's H, up to its float32 products' last bits
    res = C.gptq_quantize(ref[0].weight, h, 4, symmetric, 128)
    assert res.scales.shape == (1000, 5)
    got = model[0].dequantized_weight()
    want = C.dequantize_codes(res.codes, res.scales, res.zero_points, 128)
    # The pipeline sums H from float32 products (quantization/gram.py), so a later group's
    # scale may move by an ulp and a near-tie round the other way; nothing more.
    assert ((got - want).abs() > 1e-5 * want.abs().max()).float().mean() < 1e-3
    with torch.no_grad():
        assert _sqnr_db(ref(x.float()), model(x.float())) > 10.0


@pytest.mark.parametrize("bits,symmetric,group,act_order", [(4, True, 128, False), (4, False, 128, True),
                                                            (3, True, 32, False), (8, True, 64, True)])
def test_gptq_core_matches_float64_reference_with_a_short_group(bits, symmetric, group, act_order):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(4))
    x = torch.randn(400, 200, generator=torch.Generator().manual_seed(5))
    h = (2 * x.double().T @ x.double() / 400).float()
    a = C.gptq_quantize(w, h, bits, symmetric, group, act_order=act_order)
    b = C.gptq_quantize(w, h, bits, symmetric, group, act_order=act_order, backend="reference")
    assert a.scales.shape == (24, num_groups(200, group))
    assert (a.codes != b.codes).float().mean() <= 1e-3
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zero_points, b.zero_points)


@pytest.mark.parametrize("group", [128, 64, 48])
def test_awq_searches_match_reference_with_a_short_group(group, isa):
    x = torch.randn(300, 200, generator=torch.Generator().manual_seed(6))
    x[:, ::13] *= 20
    g, act = (x.double().T @ x.double() / 300).float(), x.abs().mean(0)
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(7))
    w[:, 197] *= 10  # an outlier in the short last group
    _, losses = C.awq_search_scale(w, g, act, 4, True, group)
    _, losses_ref = C.awq_search_scale(w, g, act, 4, True, group, backend="reference")
    torch.testing.assert_close(losses, losses_ref, rtol=1e-4, atol=0)
    ratio, closs = C.awq_search_clip(w, g, 4, False, group)
    ratio_ref, closs_ref = C.awq_search_clip(w, g, 4, False, group, backend="reference")
    assert closs.shape == (16, num_groups(200, group), 10)
    torch.testing.assert_close(closs, closs_ref, rtol=1e-4, atol=1e-6)
    assert (ratio != ratio_ref).float().mean() <= 0.05


def test_save_load_round_trip(tmp_path):
    model = _model(3)
    fresh = copy.deepcopy(model)
    ts.quantize(model, ts.Int4WeightOnly(group_size=128), progress=False)
    path = tmp_path / "m.slim.safetensors"
    ts.save(model, path)
    ts.load(fresh, path)
    assert all(isinstance(m, ts.WeightOnlyLinear) for m in fresh if not isinstance(m, nn.GELU))
    for a, b in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    x = torch.randn(4, 576)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_summary_counts_the_short_group_bytes():
    model = _model(4)
    ts.quantize(model, ts.Int4WeightOnly(group_size=128), progress=False)
    m = model[6]  # 100 inputs: one group of 100 per row
    assert m.scales.shape == (576, 1) and m.qweight.shape == (576, 50)
    text = str(ts.summary(model))
    assert "int4" in text


@pytest.mark.parametrize("cfg,group", [(ts.Int4WeightOnly(group_size=128), 128),
                                       (ts.Int8WeightOnly(group_size=64, symmetric=False), 64),
                                       (ts.Int4WeightOnly(group_size=32, symmetric=False), 32)])
def test_qat_prepare_and_convert(cfg, group):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(100, 576), nn.GELU(), nn.Linear(576, 100), nn.GELU(), nn.Linear(100, 8))
    report = ts.prepare_qat(model, cfg, progress=False)
    assert not report.skipped, [(c.name, c.reason) for c in report.skipped]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 100)
    for _ in range(2):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y_fake = model(x)
    ts.convert(model)
    layers = [m for m in model if not isinstance(m, nn.GELU)]
    assert all(isinstance(m, ts.WeightOnlyLinear) for m in layers)
    for m in layers:
        assert m.scales.shape == (m.out_features, num_groups(m.in_features, group))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_fake, rtol=1e-4, atol=1e-4)


def test_cuda_entry_points_route_short_groups_to_the_reference():
    """The CUDA kernels take whole groups only: the CUDA registrations of the ops run the
    plain-PyTorch reference for a short last group (called here on CPU tensors)."""
    x = torch.randn(6, 100)
    for fmt in ("int8", "uint4"):
        spec = get_format(fmt)
        q, s, z = wo._quantize_cuda(x, fmt, 64)
        qr, sr, zr = wo.quantize_reference(x, spec, 64)
        assert torch.equal(q, qr) and torch.equal(s, sr) and torch.equal(z, zr)
        d = wo._dequantize_cuda(q, s, z, fmt, 64, 100, torch.float32)
        assert torch.equal(d, wo.dequantize_reference(q, s, z, spec, 64, 100))
        a = torch.randn(3, 100)
        y = wo._linear_weight_only_cuda(a, q, s, z if spec.has_zero_point else None, None, fmt, 64, 0)
        torch.testing.assert_close(y, a @ d.T)


def test_bad_group_sizes_raise_clearly():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="group_size"):
            ts.Int4WeightOnly(group_size=bad)
        with pytest.raises(ValueError, match="group_size"):
            ts.WeightOnlyLinear(100, 8, "int4", bad)
        with pytest.raises(ValueError, match="group_size"):
            ops.quantize(torch.randn(4, 100), "int8", bad)
    with pytest.raises(ValueError, match="33 times 4 bits must be a whole number of bytes"):
        ts.WeightOnlyLinear(100, 8, "int4", 33)
    with pytest.raises(ValueError, match="33 times 3 bits must be a whole number of bytes"):
        ts.WeightOnlyLinear(100, 8, "int3", 33)  # loaded from a file and failed at the first forward
    with pytest.raises(ValueError, match="even"):
        ops.quantize(torch.randn(4, 100), "uint4", 33)
    # a model left as it was when a config is refused
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        ts.quantize(model, ts.Int8WeightOnly(group_size=-1), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_names_the_short_group_and_one_group_rows():
    # 576 in g128: four groups and a last one of 64; 100 in g128: one group, i.e. per channel.
    model = _model()
    report = ts.quantize(model, ts.Int4WeightOnly(group_size=128), progress=False)
    want = {"0": "int4 g128 (last group 64)", "2": "int4 g128 (last group 104)",
            "4": "int4 g128 (last group 64)", "6": "int4 per-channel"}
    rows = {r.name: r for r in report.changed}
    for name, text in want.items():
        assert model[int(name)].describe() == text and rows[name].format == text
