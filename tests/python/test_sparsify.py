"""ts.sparsify: which weights each config keeps, the sparse modules it builds, their outputs
against the dense masked reference, the report, save / load and file sizes, and bad input."""
import copy
import dataclasses
import os

import pytest
import torch
from torch import nn

import tensorslim as ts


def _mlp(width=64, hidden=96, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def _dense(mod):
    return mod.dequantized_weight()


def _batches(width=64, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, width, generator=g) for _ in range(n)]


def test_nm_magnitude_keeps_largest_per_group():
    model = _mlp()
    ref = copy.deepcopy(model)
    report = ts.sparsify(model, ts.NM(2, 4), progress=False)
    assert [c.action for c in report.changes] == ["sparsified"] * 3
    for name in ("0", "2", "4"):
        mod, w = model.get_submodule(name), ref.get_submodule(name).weight.detach()
        assert isinstance(mod, ts.NMSparseLinear)
        top = w.abs().reshape(w.shape[0], -1, 4).topk(2, dim=2).indices
        keep = torch.zeros(w.shape[0], w.shape[1] // 4, 4, dtype=torch.bool).scatter_(2, top, True)
        assert torch.equal(_dense(mod), w * keep.reshape(w.shape))
    x = torch.randn(5, 64)
    masked = copy.deepcopy(ref)
    for name in ("0", "2", "4"):
        masked.get_submodule(name).weight.data = _dense(model.get_submodule(name))
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)


def test_nm_partial_last_group():
    """in_features 30 = 7 groups of 4 + 2 columns: the last group keeps min(n, 2) = 2."""
    lin = nn.Linear(30, 8)
    model = nn.Sequential(lin)
    ts.sparsify(model, ts.NM(2, 4, include="0"), progress=False)
    w = _dense(model[0])
    assert ((w[:, :28] != 0).reshape(8, 7, 4).sum(2) <= 2).all()
    assert torch.equal(w[:, 28:], lin.weight.detach()[:, 28:])


def test_unstructured_magnitude_exact_count_and_output():
    model = _mlp()
    ref = copy.deepcopy(model)
    ts.sparsify(model, ts.Unstructured(0.9), progress=False)
    for name in ("0", "2", "4"):
        mod, w = model.get_submodule(name), ref.get_submodule(name).weight.detach()
        assert isinstance(mod, ts.CSRSparseLinear)
        kept = _dense(mod) != 0
        assert int(kept.sum()) == w.numel() - round(0.9 * w.numel()) == mod.nnz
        assert w.abs()[kept].min() >= w.abs()[~kept].max()  # the largest magnitudes stay
        assert torch.equal(_dense(mod)[kept], w[kept])


@pytest.mark.parametrize("config", [ts.NM(2, 4, values="int8"), ts.Unstructured(0.5, values="int8"),
                                    ts.NM(2, 4, values="bfloat16"), ts.NM(4, 8, values="float16"),
                                    ts.NM(2, 4, values="int4")])
def test_low_precision_values_sqnr(config):
    """Same kept positions as float32 values; the stored values within the value type's error
    (int8 / int4 round to a per-row grid of max|kept| / 127 or / 7; int4 measured 25.1-25.2 dB on
    these rows, floor 23)."""
    model = _mlp()
    fp = copy.deepcopy(model)
    ts.sparsify(fp, _with(config, values="float32"), progress=False)
    ts.sparsify(model, config, progress=False)
    for name in ("0", "2", "4"):
        a, b = _dense(fp.get_submodule(name)), _dense(model.get_submodule(name))
        sqnr = 20 * torch.log10(a.norm() / (a - b).norm())
        assert sqnr > {"int8": 38, "int4": 23}.get(config.values, 45), float(sqnr)
        assert not (b[a == 0] != 0).any()  # nothing kept that float32 values prune


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_keeps_its_dtype_by_default(dtype):
    """values="auto": n:m layers of a half model store half values (float32 ones would make a
    2:4 layer larger than the dense half one); CSR stores float32, the only float it has."""
    model, csr = _mlp().to(dtype), _mlp().to(dtype)
    dense_bytes = model[0].weight.numel() * model[0].weight.element_size()
    report = ts.sparsify(model, ts.NM(2, 4), progress=False)
    ts.sparsify(csr, ts.Unstructured(0.9), progress=False)
    expected = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    assert model[0].values_dtype == expected and model[0].values.dtype == dtype
    assert model[0].values.numel() * model[0].values.element_size() == dense_bytes // 2
    assert csr[0].values_dtype == "float32"
    assert f"2:4 magnitude {expected}" in str(report)
    assert model(torch.randn(3, 64, dtype=dtype)).dtype == dtype
    fp = _mlp()
    ts.sparsify(fp, ts.NM(2, 4), progress=False)
    assert fp[0].values_dtype == "float32"


def _with(config, **changes):
    d = config.to_dict()
    d.update(changes)
    return ts.Config.from_dict(d)


def test_sparse_storage_keeps_pruned_zeros():
    model = _mlp()
    ts.prune(model, ts.Magnitude(0.8), progress=False)
    x = torch.randn(7, 64)
    expected = model(x)
    report = ts.sparsify(model, ts.SparseStorage(), progress=False)
    assert len(report.changed) == 3
    assert all(isinstance(model.get_submodule(n), ts.CSRSparseLinear) for n in ("0", "2", "4"))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_sparse_storage_keeps_layers_it_would_enlarge_dense():
    """A layer ts.prune left out (no zeros), or one whose CSR form would outweigh its half
    weights, stays dense with why; the others are stored sparse."""
    model = _mlp()
    ts.prune(model, ts.Magnitude(0.8, exclude=["2"]), progress=False)
    report = ts.sparsify(model, ts.SparseStorage(), progress=False)
    rows = {c.name: c for c in report.changes}
    assert type(model[2]) is nn.Linear and rows["2"].action == "skipped"
    assert rows["2"].reason.startswith("0.0% zeros: stored sparse (csr float32) it would take")
    assert isinstance(model[0], ts.CSRSparseLinear) and rows["0"].action == "sparsified"
    half = _mlp().to(torch.bfloat16)
    with torch.no_grad():
        half[0].weight.mul_(torch.rand(96, 64) > 0.5)  # 50% zeros: 3 bytes a weight in CSR, 2 dense
        half[2].weight.mul_(torch.rand(96, 96) > 0.9)  # 90%: 0.6
    report = ts.sparsify(half, ts.SparseStorage(include=["0", "2"]), progress=False)
    assert type(half[0]) is nn.Linear and isinstance(half[2], ts.CSRSparseLinear)
    assert "not fewer than the dense layer's" in next(c.reason for c in report.skipped if c.name == "0")


def test_sparse_storage_auto_finds_nm():
    model = _mlp()
    ts.sparsify(model, ts.NM(2, 4), progress=False)
    dense = nn.Sequential(nn.Linear(64, 96))
    dense[0].weight.data = _dense(model[0])
    ts.sparsify(dense, ts.SparseStorage(include="0"), progress=False)
    assert isinstance(dense[0], ts.NMSparseLinear) and (dense[0].n, dense[0].m) == (2, 4)
    assert torch.equal(_dense(dense[0]), _dense(model[0]))
    with pytest.raises(ValueError, match="layer '0'.*2:4 pattern"):
        ts.sparsify(_mlp(), ts.SparseStorage(layout="nm"), progress=False)  # dense weights fit no 2:4
    pruned = _mlp()
    ts.prune(pruned, ts.Magnitude(0.8), progress=False)
    with pytest.raises(ValueError, match="layer '0'.*CSR stores float32 or int8"):
        ts.sparsify(pruned, ts.SparseStorage(values="bfloat16"), progress=False)
    assert type(pruned[0]) is nn.Linear


def test_backward_reaches_input():
    model = _mlp()
    ts.sparsify(model, ts.NM(2, 4), progress=False)
    x = torch.randn(3, 64, requires_grad=True)
    model(x).sum().backward()
    dense = nn.Sequential(*[copy.deepcopy(m) for m in model])
    for i in (0, 2, 4):
        lin = nn.Linear(model[i].in_features, model[i].out_features)
        lin.weight.data, lin.bias.data = _dense(model[i]), model[i].bias.clone()
        dense[i] = lin
    x2 = x.detach().clone().requires_grad_(True)
    dense(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [ts.NM(2, 4), ts.NM(4, 8, values="int8"), ts.Unstructured(0.9),
                                    ts.Unstructured(0.75, values="int8"), ts.NM(2, 4, values="int4")])
def test_save_load_round_trip_and_size(tmp_path, config):
    model = _mlp(width=256, hidden=512)
    dense_path = tmp_path / "dense.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_path))
    ts.sparsify(model, config, progress=False)
    path = tmp_path / "sparse.safetensors"
    ts.save(model, path)
    fresh = _mlp(width=256, hidden=512, seed=5)
    ts.load(fresh, path)
    x = torch.randn(4, 256)
    assert torch.equal(fresh(x), model(x))
    ratio = os.path.getsize(path) / os.path.getsize(dense_path)
    # bytes per dense weight: 2:4 fp32 = (2*4 + 4 bits)/4, 4:8 int8 = (4 + 12 bits)/8, 2:4 int4 =
    # (2*4 bits + 4 bits)/4, csr = density * (value + 2); plus biases, scales, row pointers and the header
    expect = {"NM": {"float32": 2.125 / 4, "int8": 0.6875 / 4, "int4": 0.375 / 4},
              "Unstructured": {"float32": (1 - getattr(config, "sparsity", 0)) * 6 / 4,
                               "int8": (1 - getattr(config, "sparsity", 0)) * 3 / 4}}[type(config).__name__][
        model.get_submodule("0").values_dtype]
    assert expect * 0.95 < ratio < expect + 0.03, (ratio, expect)


def test_summary_and_report_rows():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding_mode="reflect"), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                          nn.Linear(16, 4))
    report = ts.sparsify(model, ts.NM(2, 4, skip_output_head=False), progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["0"].action == "skipped" and "reflect" in rows["0"].reason
    assert rows["2"].action == rows["3"].action == "sparsified"
    assert rows["2"].bytes_after < rows["2"].bytes_before
    text = str(ts.summary(model))
    assert "2:4 float32" in text and "NMSparseLinear" in text


@pytest.mark.parametrize("make,match", [
    (lambda: ts.NM(5, 4), "n must be"), (lambda: ts.NM(2, 3), "m must be"), (lambda: ts.NM(0, 4), "n must be"),
    (lambda: ts.Unstructured(1.0), "sparsity"), (lambda: ts.Unstructured(-0.1), "sparsity"),
    (lambda: ts.Unstructured(0.5, values="bfloat16"), "values"), (lambda: ts.NM(2, 4, method="obs"), "method"),
    (lambda: ts.NM(2, 4, values="int2"), "values"), (lambda: ts.Unstructured(0.5, values="int4"), "values"),
])
def test_bad_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_float16_values_beyond_its_range_are_refused():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[3, 10] = 7e4  # kept by magnitude; float16 tops out at 65504
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layer '2'.*7e\\+04 is beyond float16's range"):
        ts.sparsify(model, ts.NM(2, 4, values="float16"), progress=False)  # stored inf before
    assert all(type(model.get_submodule(n)) is nn.Linear for n in ("0", "2", "4"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ts.sparsify(model, ts.NM(2, 4, values="bfloat16"), progress=False)
    assert model[2].dequantized_weight()[3, 10] == torch.tensor(7e4).bfloat16().float()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_need_data(method):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calib"):
        ts.sparsify(model, ts.NM(2, 4, method=method), progress=False)
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_magnitude_ignores_calibration_data():
    a, b = _mlp(), _mlp()
    ts.sparsify(a, ts.NM(2, 4), calib_data=_batches(), progress=False)
    ts.sparsify(b, ts.NM(2, 4), progress=False)
    assert torch.equal(_dense(a[0]), _dense(b[0]))


class _Branch(nn.Module):
    """A block whose second layer runs only when asked: the calibration data never takes it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x, use_b=False):
        return self.b(x) if use_b else torch.relu(self.a(x))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Branch() for _ in range(2)])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_layers_calibration_never_reaches_are_skipped():
    model = _Branchy()
    with pytest.warns(RuntimeWarning, match="never ran.*stay float"):
        report = ts.sparsify(model, ts.NM(2, 4, method="wanda", unreached="skip"), calib_data=_batches(),
                             progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["layers.0.b"].action == "skipped" and "never ran" in rows["layers.0.b"].reason
    assert rows["layers.1.a"].action == "sparsified"
    assert type(model.layers[0].b) is nn.Linear


@pytest.mark.parametrize("cfg", [ts.NM(2, 4, method="wanda"), ts.Unstructured(0.75, method="sparsegpt"),
                                 ts.NM(2, 4, method="sparsegpt", values="int8")], ids=lambda c: c.describe())
def test_layers_calibration_never_reaches_fall_back_to_magnitude(cfg):
    """The default unreached="fallback": the layers the data never runs are pruned by magnitude,
    the same modules a magnitude call builds; the calibrated ones as with unreached="skip"."""
    model, magnitude, skip = _Branchy(), _Branchy(), _Branchy()
    for other in (magnitude, skip):
        other.load_state_dict(model.state_dict())
    with pytest.warns(RuntimeWarning, match="got the data-free fallback"):
        report = ts.sparsify(model, cfg, calib_data=_batches(), progress=False)
    ts.sparsify(magnitude, dataclasses.replace(cfg, method="magnitude"), progress=False)
    with pytest.warns(RuntimeWarning):
        ts.sparsify(skip, dataclasses.replace(cfg, unreached="skip"), calib_data=_batches(), progress=False)
    rows = {c.name: c for c in report.changes}
    assert all(rows[f"layers.{i}.b"].format.endswith("(never ran on the calibration data)") for i in (0, 1))
    assert "magnitude" in rows["layers.0.b"].format and cfg.method in rows["layers.0.a"].format
    for name, row in rows.items():
        twin = (magnitude if name.endswith(".b") else skip).get_submodule(name)
        assert row.action == "sparsified" and torch.equal(_dense(model.get_submodule(name)), _dense(twin))


def test_layers_calibration_never_reaches_raise_under_error():
    model = _Branchy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"wanda: layers 'layers.0.b', 'layers.1.b'.*never reached"):
        ts.sparsify(model, ts.NM(2, 4, method="wanda", unreached="error"), calib_data=_batches(), progress=False)
    assert all(type(m) is nn.Linear for blk in model.layers for m in (blk.a, blk.b))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cfg,match", [
    (ts.Unstructured(0.5, method="sparsegpt"), "none of the 2 layers to calibrate ran on the calibration data"),
    # OWL's float pass finds it first, for magnitude (no pipeline after it) too
    (ts.Unstructured(0.6, method="wanda", profile="owl"), "owl': none of the 2 layers to prune ran on the calibration"),
    (ts.Unstructured(0.6, profile="owl"), "owl': none of the 2 layers to prune ran on the calibration"),
], ids=["sparsegpt", "wanda-owl", "magnitude-owl"])
def test_calibration_that_never_reaches_any_layer(cfg, match):
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])

        def forward(self, x):
            return x

    model = Bypass()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        ts.sparsify(model, cfg, calib_data=_batches(), progress=False)
    assert all(type(m) is nn.Linear for m in model.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failure_leaves_model_unchanged():
    model = _mlp()
    model[2].weight.data[0, 0] = float("nan")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="'2'"):
        ts.sparsify(model, ts.Unstructured(0.5), progress=False)
    assert all(type(a) is type(b) for a, b in zip(model, before))


def test_not_a_model_or_config():
    with pytest.raises(TypeError, match="nn.Module"):
        ts.sparsify("model", ts.NM(2, 4))
    with pytest.raises(TypeError, match="NM"):
        ts.sparsify(_mlp(), ts.Int8WeightOnly())


def test_config_json_round_trip():
    for cfg in (ts.NM(4, 8, method="sparsegpt", values="int8"), ts.Unstructured(0.75, method="wanda"),
                ts.SparseStorage(layout="csr")):
        assert ts.Config.from_json(cfg.to_json()) == cfg


def test_csr_layers_pickle_round_trip():
    """pickle.loads could not read back the uint16 column tensor pickle.dumps wrote (torch 2.13);
    the columns travel as their int16 view."""
    import pickle

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        m[0].weight.mul_(torch.rand(32, 64) > 0.8)
    ts.sparsify(m, ts.SparseStorage(layout="csr"), progress=False)
    x = torch.randn(3, 64)
    back = pickle.loads(pickle.dumps(m))
    assert back[0].cols.dtype == torch.uint16 and m[0].cols.dtype == torch.uint16
    assert torch.equal(back(x), m(x)) and torch.equal(copy.deepcopy(m)(x), m(x))


class _Block(nn.Module):
    def __init__(self, width=64, hidden=128):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList([_Block() for _ in range(2)])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _correlated(n, seed):
    """Inputs on a 16-dimensional subspace plus a little noise: correlated features, where the
    OBS update has something to compensate with."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    return [torch.randn(32, 16, generator=g) @ basis + 0.1 * torch.randn(32, 64, generator=g) for _ in range(n)]


def test_sparsegpt_joint_int4_rounds_to_the_float_sweeps_grid():
    """NM(2, 4, method="sparsegpt", values="int4") runs SparseGPT's float sweep, takes each row's
    grid from its kept weights (max |kept| / 7), and sweeps again rounding to that grid (bits =
    4), so the compensation covers the rounding: the stored scales are that grid, the weights sit
    on it, and the first layer (whose inputs are the same for both) leaves less output error than
    the float sweep's weights rounded to int4 afterwards (the paper's joint mode against
    quantizing after pruning)."""
    model = _Blocks()
    dense, flt = copy.deepcopy(model), copy.deepcopy(model)
    report = ts.sparsify(model, ts.NM(2, 4, method="sparsegpt", values="int4"), calib_data=_correlated(4, 1),
                         progress=False)
    assert [c.format for c in report.changes] == ["2:4 sparsegpt int4 joint"] * 4, report
    ts.sparsify(flt, ts.NM(2, 4, method="sparsegpt"), calib_data=_correlated(4, 1), progress=False)
    first, flt_first = model.layers[0].fc1, flt.layers[0].fc1
    assert isinstance(first, ts.NMSparseLinear) and first.values.dtype == torch.uint8
    assert torch.equal(first.scales, flt_first.dequantized_weight().abs().amax(1) / 7)
    codes = first.dequantized_weight() / first.scales[:, None]
    assert (codes - codes.round()).abs().max() < 1e-4 and int(codes.round().abs().max()) <= 7
    rounded = nn.Sequential(nn.Linear(64, 128))
    rounded[0].weight.data = flt_first.dequantized_weight()
    rounded[0].bias.data = dense.layers[0].fc1.bias.detach().clone()
    ts.sparsify(rounded, ts.SparseStorage(layout="nm", values="int4", skip_output_head=False), progress=False)
    x = torch.cat(_correlated(4, 7))
    with torch.no_grad():
        ref = dense.layers[0].fc1(x)
        joint, later = (first(x) - ref).norm(), (rounded(x) - ref).norm()
    assert joint < later, (float(joint), float(later))
