"""AWQ: the C++ scale and clip searches (every CPU path: the `isa` fixture) against their
PyTorch references, folding (only
where the float function is unchanged), input scales where no fold is valid (the same codes
a fold gives, saved and loaded exactly), output error against round to nearest, and errors."""
import copy
import json

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


class MixedBlock(nn.Module):
    """Pre-norm part (its folds are valid) then a post-norm part whose norm output is also the
    residual (its first fold candidate is not)."""

    def __init__(self, d=128):
        super().__init__()
        self.pre, self.norm2, self.fc = PreNormBlock(d), nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        h = self.norm2(self.pre(x))
        return h + self.fc(torch.relu(h))


class BranchBlock(nn.Module):
    """fc runs only on loud batches, where the norm's output is also the residual: a fold into
    the norm changes nothing on quiet batches and breaks the loud ones."""

    def __init__(self, d=128):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        if float(x.mean()) < 1.0:
            return x
        h = self.norm(x)
        return h + self.fc(torch.relu(h))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(PreNormBlock(), PostNormBlock()),
                                  lambda: nn.Sequential(MixedBlock(), MixedBlock()),
                                  lambda: nn.Sequential(PreNormBlock(), BranchBlock())])
def test_folds_checked_together_give_the_one_at_a_time_result(make, monkeypatch):
    """The block's folds are tried all at once with one check; where that check fails they are
    tried one at a time. Either way the layers and notes are those of one at a time only."""
    torch.manual_seed(0)
    model = _with_outliers(make())
    calib = [torch.randn(2, 16, 128) + 5 * (i > 0) for i in range(4)]  # the first batch quiet
    together, alone = copy.deepcopy(model), copy.deepcopy(model)
    runs = {}
    for m in (together, alone):
        calls = []
        handles = [b.register_forward_pre_hook(lambda mod, a: calls.append(1)) for b in m]
        if m is alone:
            monkeypatch.setattr(awq, "_fold_all_first", lambda *a, **k: ({}, False))
        report = awq.quantize_awq(m, WeightSpec(8, True, 128, simulate=True), make_forward_loop(calib, progress=False),
                                  progress=False)
        runs[id(m)] = (len(calls), {c.name: c.format for c in report.changed})
        for h in handles:
            h.remove()
    assert runs[id(together)][1] == runs[id(alone)][1]
    a, b = together.state_dict(), alone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    notes = runs[id(together)][1]
    if isinstance(model[0], PreNormBlock):  # both folds of block 0 valid: one check instead of two
        assert "folded into norm" in notes["0.a"] and "folded into b" in notes["0.down"]
        assert runs[id(together)][0] == runs[id(alone)][0] - 1
    if isinstance(model[1], BranchBlock):  # checked on the batch its branch runs on too
        assert "folded" not in notes["1.fc"]
    if isinstance(model[0], MixedBlock):  # the first candidate fails in the checks together
        assert "folded" not in notes["0.fc"] and "folded into pre.norm" in notes["0.pre.a"]


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
    (lambda w, g, a: C.awq_search_clip(w, g, group_size=0), "group_size must be positive"),
    (lambda w, g, a: C.awq_search_scale(w, g, a, group_size=-8), "group_size must be positive"),
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


# ---------------------------------------------------------------- input scales


class GeluMLP(nn.Module):
    """Linear -> GELU -> Linear: `down` reads a GELU output, which no scale can fold into
    (folding into `up` would pass through the GELU). Some hidden channels are large."""

    def __init__(self, d=128, hidden=256):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)
        with torch.no_grad():
            self.up.weight[::13] *= 20  # outlier input channels of `down`
            self.up.bias[::13] = 5.0

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _down_input(model, batches):
    """Mean |x| per channel of what `down` reads: the statistic AWQ's scales are powers of."""
    with torch.no_grad():
        h = torch.cat([model[0].act(model[0].up(b)).reshape(-1, 256) for b in batches])
    return h.abs().mean(0)


def test_group_without_foldable_predecessor_gets_an_input_scale():
    torch.manual_seed(3)
    model = nn.Sequential(GeluMLP())
    calib = [torch.randn(4, 32, 128) for _ in range(4)]
    x = torch.randn(4, 32, 128)
    only_down = dict(group_size=128, exclude=("0.up",))  # `down` is the only AWQ group
    rtn, ours = copy.deepcopy(model), copy.deepcopy(model)
    ts.quantize(rtn, ts.Int4WeightOnly(**only_down), progress=False)
    report = ts.quantize(ours, ts.Int4WeightOnly(algorithm="awq", **only_down), calib_data=calib, progress=False)
    note = next(c.format for c in report.changed if c.name == "0.down")
    assert "input-scaled" in note and "folded" not in note
    down = ours[0].down
    assert down.input_scale is not None and ours[0].up.__class__ is nn.Linear
    # input_scale is 1 / s for the chosen alpha, s = (mean |x|)^alpha (normalized)
    k = round(float(note.split("alpha=")[1].split()[0]) * awq.N_GRID)
    assert k > 0
    torch.testing.assert_close(down.input_scale, 1 / C.awq_scales(_down_input(model, calib).float(), k, awq.N_GRID))
    # the layer computes (x * input_scale) @ W_scaled.T + b, and that is close to the float layer
    h = model[0].act(model[0].up(x))
    with torch.no_grad():
        want = nn.functional.linear(h * down.input_scale, down.dequantized_weight(), down.bias)
        torch.testing.assert_close(down(h), want, rtol=1e-5, atol=1e-5)
        y = model(x)
        e_rtn, e_awq = (rtn(x) - y).norm(), (ours(x) - y).norm()
    assert e_awq < 0.8 * e_rtn, f"awq {e_awq:.4f} vs rtn {e_rtn:.4f}"
    assert "int4 g128 input-scaled" in str(ts.summary(ours))


class NormFc(nn.Module):
    """norm -> fc; with `residual` the norm's output is also added to the result, so AWQ may
    not fold into the norm and scales fc's input instead."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.norm, self.fc = nn.LayerNorm(128), nn.Linear(128, 128)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h) + h if self.residual else self.fc(h)


def test_input_scale_gives_the_same_layer_as_a_fold():
    """Same weights, same data: the unfoldable copy gets the codes the foldable copy gets (W * s
    quantized), and its input scale does what the fold into the norm does (1 / s)."""
    torch.manual_seed(8)
    folded = _with_outliers(nn.Sequential(NormFc(residual=False)))
    scaled = copy.deepcopy(folded)
    scaled[0].residual = True
    calib = [torch.randn(2, 16, 128) for _ in range(3)]
    notes = {}
    for model in (folded, scaled):
        report = ts.quantize(model, ts.Int4WeightOnly(algorithm="awq"), calib_data=calib, progress=False)
        notes[model[0].residual] = report.changed[0].format
    assert "folded into norm" in notes[False] and "input-scaled" in notes[True]
    assert notes[False].split(" folded")[0] == notes[True].split(" input-scaled")[0]  # the same alpha
    a, b = folded[0], scaled[0]
    assert torch.equal(a.fc.qweight, b.fc.qweight) and torch.equal(a.fc.scales, b.fc.scales)
    inv_s = a.norm.weight / b.norm.weight  # the fold divided the norm's weight by s
    torch.testing.assert_close(b.fc.input_scale, inv_s, rtol=1e-6, atol=0)
    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        torch.testing.assert_close(b.fc(b.norm(x)), a.fc(a.norm(x)), rtol=1e-4, atol=1e-5)


def test_simulated_input_scale_is_the_packed_function():
    """simulate=True folds input_scale into a float weight: the same function as the packed layer."""
    torch.manual_seed(4)
    model = nn.Sequential(GeluMLP())
    calib = [torch.randn(2, 32, 128) for _ in range(2)]
    packed, simulated = copy.deepcopy(model), copy.deepcopy(model)
    loop = make_forward_loop(calib, progress=False)
    awq.quantize_awq(packed, WeightSpec(4, True, 128), loop, progress=False)
    awq.quantize_awq(simulated, WeightSpec(4, True, 128, simulate=True), loop, progress=False)
    assert packed[0].down.input_scale is not None and type(simulated[0].down) is nn.Linear
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), packed(x), rtol=1e-5, atol=1e-5)


class SharedInput(nn.Module):
    """Two Linear layers reading one GELU output: one AWQ group, no fold possible."""

    def __init__(self):
        super().__init__()
        self.mlp = GeluMLP()
        self.a, self.b = nn.Linear(128, 64), nn.Linear(128, 64)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.mlp(x) * 4)
        return self.a(h) + self.b(h)


def test_input_scaled_layers_round_trip_exactly(tmp_path):
    torch.manual_seed(5)
    model = SharedInput()
    with torch.no_grad():
        model.mlp.down.weight[::11] *= 10  # outlier channels in the group's input
    calib = [torch.randn(4, 16, 128) for _ in range(2)]
    report = ts.quantize(model, ts.Int4WeightOnly(algorithm="awq"), calib_data=calib, progress=False)
    notes = {c.name: c.format for c in report.changed}
    assert "input-scaled" in notes["a"] and notes["a"] == notes["b"]
    # one group, one scale, but each layer its own copy (safetensors rejects shared storage)
    assert torch.equal(model.a.input_scale, model.b.input_scale)
    assert model.a.input_scale.data_ptr() != model.b.input_scale.data_ptr()
    path = tmp_path / "awq.slim.safetensors"
    ts.save(model, path)
    layers = ts.io.read_header(path)["layers"]
    assert layers["a"]["input_scale"] is True and layers["b"]["input_scale"] is True
    assert all(not spec.get("input_scale", False) for name, spec in layers.items()
               if name not in notes or "input-scaled" not in notes[name])
    torch.manual_seed(6)
    fresh = SharedInput()
    ts.load(fresh, path)
    assert fresh.a.input_scale is not None and fresh.a.describe() == "int4 per-channel input-scaled"
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_file_without_input_scale_key_still_loads(tmp_path):
    """A file as tensorslim wrote it before input scales: its layer spec has no such key."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(128, 64))
    layer = ts.WeightOnlyLinear.from_linear(model[0], "int4", 128)
    old_spec = {"kind": "weight_only_linear", "format": "int4", "group_size": 128,
                "in_features": 128, "out_features": 64, "bias": True}
    path = tmp_path / "old.safetensors"
    save_file({f"0.{k}": v for k, v in layer.state_dict().items()}, str(path), metadata={
        "tensorslim.format": "tensorslim", "tensorslim.format_version": "1", "tensorslim.version": "0.1.0",
        "tensorslim.layers": json.dumps({"0": old_spec}), "tensorslim.aliases": "{}"})
    fresh = nn.Sequential(nn.Linear(128, 64))
    ts.load(fresh, path)
    assert isinstance(fresh[0], ts.WeightOnlyLinear) and fresh[0].input_scale is None
    assert fresh[0].spec() == old_spec  # and saving it again writes the same spec
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("scale,match", [(torch.ones(64), "shape \\[128\\]"),
                                         (torch.ones(128, dtype=torch.int32), "float tensor"),
                                         (torch.full((128,), float("nan")), "NaN or Inf")])
def test_bad_input_scale(scale, match):
    codes = torch.zeros(8, 128, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        ts.WeightOnlyLinear.from_codes(codes, torch.ones(8, 1), None, "int4", 128, input_scale=scale)


def test_a_layer_applied_twice_per_batch_counts_both_inputs(monkeypatch):
    """Shared weights (one Linear called on two tensors in a forward): the scale search sees the
    statistics of every row the layer multiplies, as GPTQ's and SparseGPT's Hessians do; only an
    input shared by several layers of a group (q / k / v) counts once."""
    seen = {}
    search = C.awq_search_scale

    def spy(w, gram, act, *args, **kwargs):
        seen["gram"], seen["act"] = gram.double().clone(), act.double().clone()
        return search(w, gram, act, *args, **kwargs)

    monkeypatch.setattr(C, "awq_search_scale", spy)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 32)

        def forward(self, x):
            return self.fc(x) + self.fc(3 * x.flip(-1) + 1)

    torch.manual_seed(0)
    x = torch.randn(256, 64)
    ts.quantize(Shared(), ts.AWQ(bits=4, group_size=32, skip_output_head=False),
                calib_data=[x[i:i + 64] for i in range(0, 256, 64)], progress=False)
    rows = torch.cat([x, 3 * x.flip(-1) + 1]).double()
    want_gram, want_act = rows.T @ rows / rows.shape[0], rows.abs().mean(0)
    assert float((seen["gram"] - want_gram).norm() / want_gram.norm()) < 1e-6
    assert float((seen["act"] - want_act).abs().max()) < 1e-5


def test_nan_calibration_activations_are_named_as_such():
    """A NaN in the calibration data reached the C++ search as "g contains NaN or Inf" (the
    core's argument name); the error now says which activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    data = [torch.randn(4, 64) for _ in range(2)]
    data[1][0, 3] = float("nan")
    with pytest.raises(ValueError, match="calibration activations reaching .* contain NaN or Inf"):
        ts.quantize(model, ts.Int4WeightOnly(group_size=32, algorithm="awq"), calib_data=data, progress=False)
    assert type(model[0]) is nn.Linear
