"""ts.factorize with ts.SVD on linear layers: rank selection (rank / energy / ratio / global
budget), the activation-aware methods against plain SVD on the calibration inputs, the
module surface, save/load, composition with ts.quantize, bad input and a model left unchanged."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.lowrank.rank import Spectrum, ranks_for_budget


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 32))
    # Trained-like weights: a decaying spectrum, so low rank loses little.
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                u, s, vt = torch.linalg.svd(m.weight, full_matrices=False)
                m.weight.copy_((u * s * torch.exp(-torch.arange(len(s)) / 8.0)) @ vt)
    return model


def calib_batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven channel scales, as activations have.
    mix = torch.randn(48, 48, generator=g) * torch.linspace(0.05, 2.0, 48)
    return [torch.randn(32, 48, generator=g) @ mix for _ in range(n)]


def same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_rank_reconstruction_equals_float64_svd_truncation():
    model = mlp()
    ref = copy.deepcopy(model)
    report = ts.factorize(model, ts.SVD(rank=8), progress=False)
    assert len(report.changed) == 3 and all(r.action == "factorized" for r in report.changed)
    for i in (0, 2, 4):
        lr, dense = model[i], ref[i]
        assert isinstance(lr, ts.LowRankLinear) and lr.rank == 8
        assert (lr.in_features, lr.out_features) == (dense.in_features, dense.out_features)
        u, s, vt = torch.linalg.svd(dense.weight.detach().double(), full_matrices=False)
        expect = (u[:, :8] * s[:8]) @ vt[:8]
        assert torch.allclose(lr.weight.double(), expect, atol=1e-5)
        assert torch.equal(lr.bias, dense.bias)
        # Eckart-Young: the reported error is the optimal one.
        assert abs(lr.stats["rel_error"] - float(s[8:].norm() / s.norm())) < 1e-5
        assert abs(lr.stats["energy"] - float((s[:8] ** 2).sum() / (s ** 2).sum())) < 1e-5
    x = torch.randn(5, 48)
    expect = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
    assert torch.allclose(model[0](x), expect, atol=1e-5)


def test_energy_and_ratio_pick_the_documented_ranks():
    model = mlp()
    w = model[0].weight.detach().double()
    s = torch.linalg.svdvals(w)
    cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    expect = int((cum < 0.9).sum()) + 1
    ts.factorize(model, ts.SVD(energy=0.9, include=("0",)), progress=False)
    assert model[0].rank == expect and model[0].stats["energy"] >= 0.9
    model = mlp()
    ts.factorize(model, ts.SVD(ratio=0.5, include=("2",)), progress=False)
    assert model[2].rank == int(0.5 * 96 * 64 // (96 + 64))
    assert model[2].rank * (96 + 64) <= 0.5 * 96 * 64


def test_global_budget_takes_most_from_the_layers_that_lose_least():
    sharp = Spectrum(64, 64, torch.exp(-torch.arange(64.0, dtype=torch.float64)), 0.0)
    sharp.total = float((sharp.s ** 2).sum())
    flat = Spectrum(64, 64, torch.ones(64, dtype=torch.float64), 64.0)
    ranks = ranks_for_budget({"sharp": sharp, "flat": flat}, 0.5)
    params = sum(r * 128 if r else 64 * 64 for r in ranks.values())
    assert params <= 0.5 * 2 * 64 * 64
    assert ranks["sharp"] < 5 and (ranks["flat"] is None or ranks["flat"] > ranks["sharp"])
    with pytest.raises(ValueError, match="out of reach"):
        ranks_for_budget({"flat": flat}, 0.01)


def test_budget_meets_the_parameter_target_on_a_model():
    model = mlp()
    dense = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    report = ts.factorize(model, ts.SVD(budget=0.6), progress=False)
    kept = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert kept <= 0.6 * dense and report.changed


@torch.no_grad()
def _output_error(dense: nn.Linear, new: nn.Module, xs) -> float:
    x = torch.cat(xs)
    return float((dense(x) - new(x)).norm() / dense(x).norm())


def test_svd_llm_beats_asvd_and_plain_on_calibration_outputs():
    xs = calib_batches()
    errs = {}
    for method in ("svd", "asvd", "svd_llm"):
        model = mlp()
        first = copy.deepcopy(model[0])
        ts.factorize(model, ts.SVD(rank=6, method=method, include=("0",), damp=1e-6),
                     calib_data=None if method == "svd" else xs, progress=False)
        assert model[0].method == method
        errs[method] = _output_error(first, model[0], xs)
    # SVD-LLM's truncation is optimal for the output error on the calibration inputs.
    assert errs["svd_llm"] < errs["asvd"] < errs["svd"], errs
    assert errs["svd_llm"] < 0.8 * errs["svd"], errs


def test_activation_aware_needs_calibration_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        ts.factorize(mlp(), ts.SVD(rank=4, method="asvd"), progress=False)


class _SideBranch(nn.Module):
    """mlp() plus a layer the calibration never runs (a branch its data does not take)."""

    def __init__(self):
        super().__init__()
        self.body, self.side = mlp(), nn.Linear(48, 48)
        with torch.no_grad():
            self.side.weight.copy_(mlp(seed=2)[0].weight[:48])

    def forward(self, x, side=False):
        return self.body(self.side(x) if side else x)


@pytest.mark.parametrize("method", ["asvd", "svd_llm"])
def test_layers_calibration_never_reaches(method):
    """unreached="fallback" (default): plain SVD for that layer, the same factors as a plain
    call, with a note; "skip": it stays dense; "error": a ValueError, the model unchanged."""
    xs = calib_batches()
    model, plain = _SideBranch(), _SideBranch()
    with pytest.warns(RuntimeWarning, match=rf"SVD\(method='{method}'\): 1 layer\(s\) .* fallback.*'side'"):
        report = ts.factorize(model, ts.SVD(rank=6, method=method, damp=1e-6), calib_data=xs, progress=False)
    ts.factorize(plain, ts.SVD(rank=6, include=("side",)), progress=False)
    rows = {c.name: c.reason for c in report.changes}
    assert model.side.method == "svd" and model.body[0].method == method
    assert rows["side"].endswith("never ran on the calibration data: plain SVD") and "never" not in rows["body.0"]
    assert torch.equal(model.side.up.weight, plain.side.up.weight)
    assert torch.equal(model.side.down.weight, plain.side.down.weight)

    model = _SideBranch()
    with pytest.warns(RuntimeWarning, match="stay float"):
        report = ts.factorize(model, ts.SVD(rank=6, method=method, unreached="skip"), calib_data=xs, progress=False)
    assert type(model.side) is nn.Linear and model.body[0].method == method
    assert {c.name: c.reason for c in report.skipped} == {"side": "never ran on the calibration data: nothing to "
                                                                   "calibrate on"}
    model = _SideBranch()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer 'side': the calibration data never reached it"):
        ts.factorize(model, ts.SVD(rank=6, method=method, unreached="error"), calib_data=xs, progress=False)
    assert type(model.side) is nn.Linear and all(type(model.body[i]) is nn.Linear for i in (0, 2, 4))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_module_surface_and_summary():
    model = mlp()
    ts.factorize(model, ts.SVD(rank=8, exclude=("4",)), progress=False)
    lr = model[0]
    assert lr.weight.shape == (96, 48) and lr.bias.shape == (96,)
    with pytest.raises((AttributeError, KeyError)):
        lr.weight = nn.Parameter(torch.zeros(96, 48))
    text = str(ts.summary(model))
    assert "svd rank 8" in text and "energy" in text and "rel.err" in text and "FLOPs" in text
    assert "excluded by pattern" in text  # a layer left out, with its reason
    rows = {r.name: r for r in ts.summary(model).changes}
    assert rows["0"].action == "factorized" and rows["0"].bytes_after < rows["0"].bytes_before


def test_save_load_into_the_original_architecture(tmp_path):
    model = mlp()
    ts.factorize(model, ts.SVD(energy=0.95), progress=False)
    path = tmp_path / "m.slim.safetensors"
    ts.save(model, path)
    header = ts.io.read_header(path)
    assert header["layers"]["0"]["kind"] == "lowrank_linear" and header["layers"]["0"]["rank"] == model[0].rank
    fresh = mlp(seed=5)
    ts.load(fresh, path)
    assert isinstance(fresh[0], ts.LowRankLinear) and same_params(fresh, model)
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), model(x))
    assert "energy" in str(ts.summary(fresh))


def test_quantize_after_factorize_quantizes_the_factors(tmp_path):
    model = mlp()
    ref = copy.deepcopy(model)
    ts.factorize(model, ts.SVD(rank=16, exclude=("4",)), progress=False)
    factorized = copy.deepcopy(model)
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert {r.name for r in report.changed} == {"0.down", "0.up", "2.down", "2.up", "4"}
    assert isinstance(model[0].down, ts.WeightOnlyLinear) and isinstance(model[0].up, ts.WeightOnlyLinear)
    x = torch.randn(4, 48)
    assert torch.allclose(model(x), factorized(x), atol=0.02 * float(ref(x).detach().abs().max()))
    assert model[0].weight.shape == (96, 48)  # still reconstructs, from dequantized factors
    path = tmp_path / "q.slim.safetensors"
    ts.save(model, path)
    fresh = mlp(seed=3)
    ts.load(fresh, path)
    assert isinstance(fresh[2].up, ts.WeightOnlyLinear) and torch.equal(fresh(x), model(x))


def test_factorizing_twice_leaves_the_factors_alone():
    model = mlp()
    ts.factorize(model, ts.SVD(rank=8), progress=False)
    with pytest.warns(UserWarning, match="ts.factorize: nothing was compressed"):
        report = ts.factorize(model, ts.SVD(rank=4), progress=False)
    assert not report.changed
    assert all("a factor of the already compressed layer" in r.reason for r in report.skipped if "." in r.name)


def test_config_json_round_trip_and_validation():
    cfg = ts.SVD(budget=0.8, method="svd_llm", exclude=("*.head",))
    back = ts.Config.from_json(cfg.to_json())
    assert back == cfg and json.loads(cfg.to_json())["type"] == "SVD"
    t = ts.Tucker(ranks=(8, 4))
    assert ts.Config.from_json(t.to_json()) == t
    assert ts.Config.from_json(ts.CP(rank=5).to_json()) == ts.CP(rank=5)
    bad = [dict(), dict(rank=4, energy=0.9), dict(rank=0), dict(rank=2.5), dict(energy=0.0),
           dict(energy=1.5), dict(ratio=1.0), dict(ratio=-0.1), dict(budget=0.0),
           dict(rank=4, method="qr"), dict(energy=0.9, solver="randomized"), dict(rank=4, alpha=2),
           dict(energy=True)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            ts.SVD(**kwargs)
    for kwargs in (dict(), dict(ranks=(1, 2, 3)), dict(ranks=0), dict(energy=2.0), dict(ratio=1.0)):
        with pytest.raises(ValueError):
            ts.Tucker(**kwargs)
    with pytest.raises(ValueError):
        ts.CP(rank=0)
    with pytest.raises(TypeError):
        ts.factorize(mlp(), ts.Int8WeightOnly())


def test_rank_above_min_dimension_skips_that_layer():
    # as a layer whose factors would not be smaller: a model-wide rank does not fail on one small
    # layer (an MoE gate, Mamba's dt_proj); alone it changes nothing and warns
    model = mlp()
    before = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="nothing was compressed"):
        report = ts.factorize(model, ts.SVD(rank=40), progress=False)
    row = next(c for c in report.skipped if c.name == "4")
    assert row.reason == "rank 40 is larger than min(in, out) = 32: nothing to factorize"
    assert same_params(model, before) and all(type(a) is type(b) for a, b in zip(model, before))


def test_nan_weight_names_the_layer_and_changes_nothing():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="layer '2'.*NaN"):
        ts.factorize(model, ts.SVD(rank=4), progress=False)
    sa, sb = model.state_dict(), before.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k].nan_to_num(), sb[k].nan_to_num()) for k in sa)


def test_rank_that_costs_more_is_skipped_with_a_reason():
    model = mlp()
    # [96, 48]: rank 40 holds 40 * 144 = 5760 > 4608 parameters; [64, 96]: 40 * 160 = 6400 > 6144.
    with pytest.warns(UserWarning, match="nothing was compressed"):
        report = ts.factorize(model, ts.SVD(rank=40, exclude=("4",)), progress=False)
    reasons = {r.name: r.reason for r in report.skipped}
    assert "factorizing would cost more" in reasons["0"] and "factorizing would cost more" in reasons["2"]
    assert isinstance(model[0], nn.Linear)
    model = mlp()
    with pytest.warns(UserWarning, match="nothing was compressed"):
        report = ts.factorize(model, ts.SVD(energy=1.0), progress=False)
    assert "energy 1.0 needs rank" in {r.name: r.reason for r in report.skipped}["0"]


def test_randomized_solver_close_to_exact():
    model, ref = mlp(), mlp()
    ts.factorize(model, ts.SVD(rank=12, solver="randomized", include=("2",)), progress=False)
    ts.factorize(ref, ts.SVD(rank=12, solver="exact", include=("2",)), progress=False)
    assert model[2].stats["rel_error"] <= 1.05 * ref[2].stats["rel_error"] + 1e-6


def test_summary_totals_count_quantized_factors_once():
    """A factorized layer's row holds its factors' bytes; the factors' own rows (quantized after
    factorizing) are shown but not added again."""
    from tensorslim.report import module_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    dense = module_bytes(model)
    ts.factorize(model, ts.SVD(ratio=0.5), progress=False)
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    s = ts.summary(model)
    assert {c.name for c in s.changed} >= {"0", "0.down", "0.up", "2", "2.down", "2.up"}
    assert s.totals() == (dense, module_bytes(model))


def test_input_statistics_see_an_input_changed_in_place_between_layers():
    """x += fc1(x); fc2(x): fc2's statistics are of x after the add (the same tensor object as
    fc1's input, changed in place), not fc1's reused."""
    from tensorslim.lowrank.stats import collect_input_stats

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            x += self.fc1(x)
            x.mul_(torch.arange(1, 33, dtype=x.dtype))
            return self.fc2(x)

    torch.manual_seed(0)
    block = Block().eval()
    calib = [torch.randn(64, 32) for _ in range(2)]
    seen = {"fc1": [], "fc2": []}
    for name in seen:
        getattr(block, name).register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].detach().clone()))

    def loop(model):
        with torch.no_grad():
            for c in calib:
                model(c.clone())

    stats = collect_input_stats(block, {"fc1": block.fc1, "fc2": block.fc2}, loop, with_gram=True)
    for name in ("fc1", "fc2"):
        x = torch.cat(seen[name]).double()
        assert torch.allclose(stats[name].abs_sum, x.abs().sum(0), rtol=1e-6), name
        gram = x.T @ x  # the stats' products are float32 (summed in float64)
        assert float((stats[name].gram - gram).abs().max()) < 1e-5 * float(gram.abs().max()), name


def test_calibration_leaves_a_training_mode_model_as_it_was():
    """Calibration runs in eval mode: BatchNorm statistics do not move (even when factorize then
    fails), and every module's own mode comes back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 64),
                          nn.Linear(64, 8))
    model[3].eval()  # a mixed-mode model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="out of reach"):
        ts.factorize(model, ts.SVD(budget=0.01, method="svd_llm", skip_output_head=False),
                     calib_data=[torch.randn(16, 32) + 3], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model] == [True, True, True, False, True, True]
    ts.quantize(model, ts.Int4WeightOnly(group_size=32, algorithm="gptq"), calib_data=[torch.randn(16, 32) + 3],
                progress=False)
    assert torch.equal(model[1].running_mean, before["1.running_mean"]) and model[1].training


def test_ratio_rank_at_an_exact_budget():
    """0.7 of 48 x 80 is exactly 2688 parameters, which rank 21 holds (21 x 128); the float
    product 2687.99999... gave 20."""
    from tensorslim.lowrank.rank import rank_for_ratio

    assert rank_for_ratio(48, 80, 0.7) == 21
    assert rank_for_ratio(48, 80, 0.69) == 20 and rank_for_ratio(64, 64, 0.3) == 9


def test_bias_can_be_set_and_removed_as_on_nn_linear(tmp_path):
    # Code that resets or swaps a layer's bias (BitFit, re-initialization) reaches up.bias;
    # before, `layer.bias = nn.Parameter(...)` raised KeyError and `= None` AttributeError.
    model = mlp()
    ts.factorize(model, ts.SVD(rank=16), progress=False)
    x = torch.randn(5, 48)
    new = nn.Parameter(torch.linspace(-1, 1, 96))
    model[0].bias = new
    assert model[0].bias is new and model[0].up.bias is new
    assert torch.allclose(model[0](x), F.linear(x, model[0].weight, new), atol=1e-5)
    del model[2].bias  # as on nn.Linear: no bias after
    assert model[2].bias is None and model[2].up.bias is None
    assert torch.equal(model[2](torch.zeros(1, 96)), torch.zeros(1, 64))  # no bias left to add
    kept = model[0].bias
    for bad, err, what in ((torch.zeros(96), TypeError, "LowRankLinear.bias: expected an nn.Parameter or None"),
                           (nn.Parameter(torch.zeros(95)), ValueError, r"LowRankLinear.bias: expected shape \(96,\)"),
                           (3.0, TypeError, "LowRankLinear.bias: expected an nn.Parameter or None")):
        with pytest.raises(err, match=what):
            model[0].bias = bad
        assert model[0].bias is kept
    path = tmp_path / "b.slim.safetensors"
    ts.save(model, path)
    fresh = ts.load(mlp(seed=5), path)
    assert fresh[2].bias is None and same_params(fresh, model)
    assert torch.equal(fresh(x), model(x))
    # on quantized factors the bias goes to the compressed layer, which adds it in float32
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    before = model[0](x)
    model[0].bias = nn.Parameter(model[0].bias.detach() + 2.0)
    assert isinstance(model[0].up, ts.WeightOnlyLinear)
    assert torch.allclose(model[0](x), before + 2.0, atol=1e-5)
    with pytest.raises(TypeError, match="expected an nn.Parameter"):  # its buffer would take it
        model[0].bias = torch.zeros(96, dtype=torch.float64)
    # in half, .bias reads as a half copy of the held float32 one: putting it back changes nothing
    model.half()
    out = model(x.half())
    model[0].bias = model[0].bias
    assert torch.equal(model(x.half()), out) and model[0].state_dict()["up.bias"].dtype == torch.float32
