"""N-bit integer weight-only layers (IntWeightOnly bits 3, 5, 6, 7: the low-bit kernels) on
widths the group size does not divide (issue 15). These run through ops/lowbit.py, made
partial-group aware by the low-bit change; run this file once both are merged."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.formats import num_groups
from tensorslim.ops import calibration as C


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(576, 1000), nn.GELU(), nn.Linear(1000, 576), nn.GELU(),
                         nn.Linear(576, 100), nn.GELU(), nn.Linear(100, 576))


def _sqnr_db(ref, got):
    return float(20 * torch.log10(ref.norm() / (ref - got).norm()))


def _layers(model):
    return [m for m in model if not isinstance(m, nn.GELU)]


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_quantizes_every_width(bits, symmetric):
    model = _model(bits)
    ref = copy.deepcopy(model)
    report = ts.quantize(model, ts.IntWeightOnly(bits=bits, symmetric=symmetric, group_size=128),
                         progress=False)
    assert not report.skipped, [(c.name, c.reason) for c in report.skipped]
    fmt = f"{'int' if symmetric else 'uint'}{bits}"
    for m, r in zip(_layers(model), _layers(ref)):
        assert isinstance(m, ts.WeightOnlyLinear) and m.fmt == fmt
        assert m.scales.shape == (m.out_features, num_groups(m.in_features, 128))
        w = m.dequantized_weight()
        # the same values as the calibration cores' round to nearest, short group included
        want = C.fake_quant_reference(r.weight.detach(), bits, symmetric, 128)
        torch.testing.assert_close(w, want, rtol=0, atol=0)
        assert _sqnr_db(r.weight.detach(), w) > 6.0 * bits - 8
        for M in (1, 5, 17):
            x = torch.randn(M, m.in_features)
            with torch.no_grad():
                y = m(x)
            torch.testing.assert_close(y.double(), nn.functional.linear(x.double(), w.double(), r.bias.double()),
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["awq", "gptq"])
def test_calibrated_3bit_quantizes_every_width(algorithm):
    model = _model(11)
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 32, 576, generator=gen) for _ in range(4)]
    report = ts.quantize(model, ts.IntWeightOnly(bits=3, group_size=128, algorithm=algorithm),
                         calib_data=calib, progress=False)
    assert not report.skipped, [(c.name, c.reason) for c in report.skipped]
    assert all(isinstance(m, ts.WeightOnlyLinear) for m in _layers(model))
    x = torch.randn(8, 576)
    with torch.no_grad():
        assert _sqnr_db(ref(x), model(x)) > 5.0


def test_save_load_round_trip(tmp_path):
    model = _model(12)
    fresh = copy.deepcopy(model)
    ts.quantize(model, ts.IntWeightOnly(bits=5, group_size=128), progress=False)
    ts.save(model, tmp_path / "m.slim.safetensors")
    ts.load(fresh, tmp_path / "m.slim.safetensors")
    x = torch.randn(3, 576)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_qat_prepare_and_convert_3bit():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(100, 576), nn.GELU(), nn.Linear(576, 100))
    report = ts.prepare_qat(model, ts.IntWeightOnly(bits=3, group_size=128), progress=False)
    assert not report.skipped
    x = torch.randn(8, 100)
    with torch.no_grad():
        y_fake = model(x)
    ts.convert(model)
    assert all(isinstance(m, ts.WeightOnlyLinear) for m in _layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_fake, rtol=1e-4, atol=1e-4)
