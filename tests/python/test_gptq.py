"""GPTQ: the C++ core against the float64 PyTorch reference of the same algorithm, its output
error against round to nearest, damping, the packed layers ts.quantize builds, and errors."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.ops import calibration as C
from tensorslim.quantization import gptq
from tensorslim.quantization.blockwise import WeightSpec
from tensorslim.quantization.calibrate import make_forward_loop


def correlated_inputs(n, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.3 + torch.eye(cols)
    x = torch.randn(n, cols, generator=gen) @ mix
    x[:, ::17] *= 6  # a few loud channels, as LLM activations have
    return x


def hessian(x):
    return (2 * x.double().T @ x.double() / x.shape[0]).float()


@pytest.mark.parametrize("bits,group,symmetric,act_order", [
    (4, 128, True, False), (4, 128, False, True), (3, 64, True, True), (3, 32, False, False),
    (2, 256, True, False), (8, 128, False, False), (4, 256, True, True),
])
def test_native_matches_float64_reference(bits, group, symmetric, act_order):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    h = hessian(correlated_inputs(512, 256))
    a = C.gptq_quantize(w, h, bits, symmetric, group, act_order=act_order)
    b = C.gptq_quantize(w, h, bits, symmetric, group, act_order=act_order, backend="reference")
    assert a.codes.dtype == torch.int32 and a.codes.shape == (48, 256)
    assert (a.codes != b.codes).float().mean() <= 1e-3  # only near-ties may differ
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zero_points, b.zero_points)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    qmin, qmax, _ = C.int_grid(bits, symmetric)
    assert int(a.codes.min()) >= qmin and int(a.codes.max()) <= qmax


def _dequant(res, group):
    return C.dequantize_codes(res.codes, res.scales, res.zero_points, group)


def _same_but_ties(a, b):
    """The pipeline sums H from float32 products (gram.py): its last bits differ from the
    float64 H here, so a later group's scale may move by an ulp and a near-tie round the
    other way; nothing more."""
    return ((a - b).abs() > 1e-5 * b.abs().max()).float().mean() < 1e-3


# (bits, symmetric, ceiling on gptq / rtn output error): the 2-bit symmetric grid
# {-2, -1, 0, 1} x amax leaves little room to compensate errors.
@pytest.mark.parametrize("bits,symmetric,ceiling", [(4, True, 0.8), (3, True, 0.8), (3, False, 0.8),
                                                    (2, False, 0.9), (2, True, 0.97)])
def test_output_error_below_round_to_nearest(bits, symmetric, ceiling):
    x = correlated_inputs(1024, 256, seed=2)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    res = C.gptq_quantize(w, hessian(x), bits, symmetric, 128)
    err_gptq = (x @ (w - _dequant(res, 128)).T).norm()
    err_rtn = (x @ (w - C.fake_quant_reference(w, bits, symmetric, 128)).T).norm()
    assert err_gptq < ceiling * err_rtn, f"INT{bits}: gptq {err_gptq:.1f} vs rtn {err_rtn:.1f}"


def test_dead_inputs_quantize_to_zero():
    x = correlated_inputs(256, 128)
    x[:, 5] = 0  # an input channel that never fires
    w = torch.randn(8, 128)
    res = C.gptq_quantize(w, hessian(x), 4, True, 128)
    assert torch.all(_dequant(res, 128)[:, 5] == 0)


def test_damping_raised_with_warning_in_the_pipeline():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    calib = [torch.randn(1, 4, 128)]  # 4 tokens: H has rank 4, singular without damping
    with pytest.warns(RuntimeWarning, match="damping raised"):
        gptq.quantize_gptq(model, WeightSpec(4, True, 128), make_forward_loop(calib, progress=False),
                           damp=0.0, progress=False)
    assert sum(isinstance(m, ts.WeightOnlyLinear) for m in model.modules()) == 2


def test_ts_quantize_builds_packed_layers_with_gptq_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))
    ref = copy.deepcopy(model)
    calib = [correlated_inputs(64, 256, seed=s)[None] for s in range(4)]
    for symmetric in (True, False):
        q = copy.deepcopy(model)
        report = ts.quantize(q, ts.Int4WeightOnly(group_size=128, symmetric=symmetric, algorithm="gptq"),
                             calib_data=calib, progress=False)
        assert [c.name for c in report.changed] == ["0", "2"]
        assert all("gptq" in c.format for c in report.changed)
        # block 0 sees the calibration data itself: its codes are GPTQ's for that H
        x = torch.cat([c.reshape(-1, 256) for c in calib])
        res = C.gptq_quantize(ref[0].weight, hessian(x), 4, symmetric, 128)
        assert _same_but_ties(q[0].dequantized_weight(), _dequant(res, 128))
        assert torch.equal(q[0].bias, ref[0].bias)
        # block 2 is calibrated on the quantized block's outputs
        h2 = hessian(nn.functional.gelu(q[0](x)).detach())
        res2 = C.gptq_quantize(ref[2].weight, h2, 4, symmetric, 128)
        assert (q[2].dequantized_weight() != _dequant(res2, 128)).float().mean() < 1e-3
        with torch.no_grad():
            y, y_ref = q(x), ref(x)
        assert float((y - y_ref).norm() / y_ref.norm()) < 0.1


@pytest.mark.parametrize("bits,symmetric", [(3, True), (3, False), (2, False), (8, True)])
def test_other_bit_widths_pack_gptq_codes(bits, symmetric):
    fmt = f"{'int' if symmetric else 'uint'}{bits}"
    if fmt not in ts.FORMATS:
        pytest.skip(f"the format table has no {fmt} yet")
    model = nn.Sequential(nn.Linear(256, 64))
    ref = copy.deepcopy(model)
    calib = [correlated_inputs(128, 256, seed=7)[None]]
    report = ts.quantize(model, ts.IntWeightOnly(bits=bits, symmetric=symmetric, algorithm="gptq"),
                         calib_data=calib, progress=False)
    assert report.changed[0].format.startswith(f"{fmt} g128")
    layer = model[0]
    assert isinstance(layer, ts.WeightOnlyLinear) and layer.fmt == fmt
    res = C.gptq_quantize(ref[0].weight, hessian(calib[0][0]), bits, symmetric, 128)
    assert _same_but_ties(layer.dequantized_weight(), _dequant(res, 128))
    x = torch.randn(4, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, _dequant(res, 128), ref[0].bias),
                                   rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))
    q = copy.deepcopy(model)
    ts.quantize(q, ts.Int4WeightOnly(algorithm="gptq"), calib_data=[torch.randn(2, 16, 128)], progress=False)
    ts.save(q, tmp_path / "m.slim.safetensors")
    fresh = copy.deepcopy(model)
    ts.load(fresh, tmp_path / "m.slim.safetensors")
    x = torch.randn(5, 128)
    assert torch.equal(fresh(x), q(x))


def test_missing_calibration_data_is_a_clear_error():
    model = nn.Sequential(nn.Linear(128, 128))
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        ts.quantize(model, ts.Int4WeightOnly(algorithm="gptq"))
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(h=torch.eye(64)), ValueError, "h must be"),
    (dict(h=torch.full((128, 128), float("nan"))), ValueError, "NaN"),
    (dict(group_size=-48), ValueError, "group_size must be positive"),
    (dict(bits=9), ValueError, "bits"),
    (dict(damp=-1.0), ValueError, "damp"),
    (dict(w=torch.zeros(4, 128, dtype=torch.int32)), TypeError, "float"),
])
def test_bad_arguments(kwargs, err, match):
    args = dict(w=torch.randn(4, 128), h=torch.eye(128), bits=4, group_size=128)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        C.gptq_quantize(**args)


def test_gptq_config_act_order_and_json():
    cfg = ts.GPTQ(bits=4, group_size=64, act_order=True, damp=0.05)
    assert ts.Config.from_json(cfg.to_json()) == cfg
    model = nn.Sequential(nn.Linear(256, 32))
    ref = copy.deepcopy(model)
    calib = [correlated_inputs(256, 256, seed=9)[None]]
    report = ts.quantize(model, cfg, calib_data=calib, progress=False)
    assert report.changed[0].format == "int4 g64 gptq act-order"
    res = C.gptq_quantize(ref[0].weight, hessian(calib[0][0]), 4, True, 64, act_order=True, damp=0.05)
    assert torch.equal(model[0].dequantized_weight(), _dequant(res, 64))


@pytest.mark.parametrize("kwargs", [dict(damp=-0.1), dict(block_size=0), dict(algorithm="awq"), dict(bits=1),
                                    dict(act_order="no"), dict(fit_float_outputs=1)])
def test_gptq_config_bad_values(kwargs):
    with pytest.raises(ValueError):
        ts.GPTQ(**kwargs)


def test_sequential_mode_sees_earlier_layers_quantized():
    """With sequential=True the second layer's H comes from the block with the first layer
    already quantized; in the default mode from the float block."""
    torch.manual_seed(3)
    model = Net2()
    calib = [correlated_inputs(64, 128, seed=11)[None]]
    x = calib[0][0]
    for seq in (False, True):
        q = copy.deepcopy(model)
        gptq.quantize_gptq(q, WeightSpec(4, True, 128), make_forward_loop(calib, progress=False),
                           sequential=seq, progress=False)
        first = q.fc1.dequantized_weight() if seq else model.fc1.weight
        with torch.no_grad():
            h2 = hessian(torch.relu(nn.functional.linear(x, first, model.fc1.bias)))
        res = C.gptq_quantize(model.fc2.weight, h2, 4, True, 128)
        assert (q.fc2.dequantized_weight() != _dequant(res, 128)).float().mean() < 1e-3


class Net2(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(128, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
