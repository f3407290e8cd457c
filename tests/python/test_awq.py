"""AWQ: the C++ scale and clip searches (every CPU path: the `isa` fixture) against their
PyTorch references, folding (only
where the float function is unchanged), output error against round to nearest, and errors."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.ops import calibration as C
from tensorslim.quantization import awq
from tensorslim.quantization.blockwise import WeightSpec
from tensorslim.quantization.calibrate import make_forward_loop


def outlier_inputs(n, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen)
    x[:, ::13] *= 20  # salient channels: what AWQ protects
    return x


def gram_and_act(x):
    return (x.double().T @ x.double() / x.shape[0]).float(), x.abs().mean(0)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 128), (4, False, 64), (3, True, 128),
                                                  (3, False, 32), (2, False, 128), (8, True, 256)])
def test_scale_search_matches_reference(bits, symmetric, group, isa):
    x = outlier_inputs(512, 256)
    g, act = gram_and_act(x)
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    k, losses = C.awq_search_scale(w, g, act, bits, symmetric, group)
    k_ref, losses_ref = C.awq_search_scale(w, g, act, bits, symmetric, group, backend="reference")
    assert losses.shape == (20,)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-4, atol=0)
    assert k == k_ref or losses_ref[k] <= losses_ref[k_ref] * (1 + 1e-4)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 128), (4, False, 64), (3, True, 32), (2, False, 128)])
def test_clip_search_matches_reference(bits, symmetric, group, isa):
    x = outlier_inputs(256, 256, seed=2)
    g, _ = gram_and_act(x)
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(3))
    w[:, 7] *= 10  # an outlier weight in some groups makes clipping pay
    ratio, losses = C.awq_search_clip(w, g, bits, symmetric, group)
    ratio_ref, losses_ref = C.awq_search_clip(w, g, bits, symmetric, group, backend="reference")
    assert losses.shape == (24, 256 // group, 10)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-4, atol=1e-6)
    assert (ratio != ratio_ref).float().mean() <= 0.02  # only near-equal losses may differ
    assert set(ratio.unique().tolist()) <= set(C.clip_ratios(20, 0.5).tolist())
    assert (ratio < 1).any()


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("uint4", False), ("int8", True)])
def test_unclipped_codes_are_the_formats_round_to_nearest(fmt, symmetric):
    w = torch.randn(16, 256)
    bits = ts.FORMATS[fmt].bits
    codes, scales, zps = C.quantize_codes_reference(w, bits, symmetric, 128)
    q, s, z = ts.ops.quantize(w, fmt, 128)
    layer = ts.WeightOnlyLinear.from_codes(codes, scales, None if symmetric else zps, fmt, 128)
    assert torch.equal(layer.qweight, q) and torch.equal(layer.scales, s)
    if not symmetric:
        assert torch.equal(layer.zero_points, z)


def test_scale_search_prefers_protecting_salient_channels():
    x = outlier_inputs(1024, 256, seed=4)
    g, act = gram_and_act(x)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    k, losses = C.awq_search_scale(w, g, act, 4, True, 128)
    assert k > 0 and losses[k] < 0.9 * losses[0]  # scaling beats plain rounding (alpha = 0)


class PreNormBlock(nn.Module):
    """LLaMA-like: norm -> (a, b) -> product -> down, plus a residual around it."""

    def __init__(self, d=128, hidden=256):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.relu(self.a(h)) * self.b(h))


class PostNormBlock(nn.Module):
    """BERT-like: the norm's output is also the residual, so no scale may fold into it."""

    def __init__(self, d=128):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc(torch.relu(h))


def _with_outliers(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + torch.rand(m.weight.shape) * 4 * (torch.arange(m.weight.numel()) % 11 == 0))
    return model


def test_folds_keep_the_float_function_and_skip_invalid_ones():
    torch.manual_seed(0)
    model = _with_outliers(nn.Sequential(PreNormBlock(), PostNormBlock()))
    calib = [torch.randn(2, 16, 128) for _ in range(4)]
    ref = copy.deepcopy(model)
    # 8-bit simulated weights: folding errors would dwarf the quantization error
    report = awq.quantize_awq(model, WeightSpec(8, True, 128, simulate=True),
                              make_forward_loop(calib, progress=False), progress=False)
    notes = {c.name: c.format for c in report.changed}
    assert "folded into norm" in notes["0.a"] and notes["0.a"] == notes["0.b"]
    assert "folded into b" in notes["0.down"]  # through the elementwise product, not the relu
    assert "folded" not in notes["1.fc"]
    x = torch.randn(3, 16, 128)
    with torch.no_grad():
        err = (model(x) - ref(x)).norm() / ref(x).norm()
    assert err < 5e-3


def test_awq_output_error_below_round_to_nearest():
    torch.manual_seed(1)
    model = _with_outliers(nn.Sequential(PreNormBlock()))
    calib = [torch.randn(4, 32, 128) for _ in range(4)]
    x = torch.randn(4, 32, 128)
    rtn, ours = copy.deepcopy(model), copy.deepcopy(model)
    ts.quantize(rtn, ts.Int4WeightOnly(group_size=128), progress=False)
    report = ts.quantize(ours, ts.Int4WeightOnly(group_size=128, algorithm="awq"), calib_data=calib,
                         progress=False)
    assert {c.name for c in report.changed} == {"0.a", "0.b", "0.down"}
    assert all(isinstance(m, ts.WeightOnlyLinear) for m in (ours[0].a, ours[0].b, ours[0].down))
    with torch.no_grad():
        y = model(x)
        e_rtn, e_awq = (rtn(x) - y).norm(), (ours(x) - y).norm()
    assert e_awq < e_rtn, f"awq {e_awq:.4f} vs rtn {e_rtn:.4f}"


def test_missing_calibration_data_is_a_clear_error():
    model = nn.Sequential(PreNormBlock())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="AWQ needs calibration data"):
        ts.quantize(model, ts.Int4WeightOnly(algorithm="awq"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call,match", [
    (lambda w, g, a: C.awq_search_scale(w, g[:64, :64], a), "g must be"),
    (lambda w, g, a: C.awq_search_scale(w, g, a[:10]), "act must have"),
    (lambda w, g, a: C.awq_search_scale(w, g, a, n_grid=0), "n_grid"),
    (lambda w, g, a: C.awq_search_clip(w, g, max_shrink=1.5), "max_shrink"),
    (lambda w, g, a: C.awq_search_clip(w, g, group_size=100), "does not divide"),
    (lambda w, g, a: C.awq_search_clip(w, g * float("inf")), "NaN or Inf"),
])
def test_bad_arguments(call, match):
    x = outlier_inputs(64, 128)
    g, act = gram_and_act(x)
    with pytest.raises(ValueError, match=match):
        call(torch.randn(8, 128), g, act)


def test_awq_config_settings_and_json():
    cfg = ts.AWQ(bits=4, n_grid=10, max_shrink=0.3)
    assert ts.Config.from_json(cfg.to_json()) == cfg
    torch.manual_seed(2)
    model = _with_outliers(nn.Sequential(PreNormBlock()))
    report = ts.quantize(model, cfg, calib_data=[torch.randn(2, 16, 128)], progress=False)
    alphas = {float(c.format.split("alpha=")[1].split()[0]) for c in report.changed}
    assert alphas <= {k / 10 for k in range(10)}  # the 10-point grid was used


@pytest.mark.parametrize("kwargs", [dict(n_grid=0), dict(max_shrink=1.0), dict(n_grid=4, max_shrink=0.1),
                                    dict(algorithm="gptq")])
def test_awq_config_bad_values(kwargs):
    with pytest.raises(ValueError):
        ts.AWQ(**kwargs)
