"""ChannelPrune(compensate=True): each consumer's bias takes the removed channels' mean
contribution (FLAP): the bias against a float64 reference, the output's mean over the
calibration rows kept exactly, a linear without a bias given one (saved and loaded back),
convs left alone, and bad input (MiniLM's gain: test_prune_wanda_importance.py)."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts


def _mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=bias))


def _data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(24, 16, generator=g) + 0.5 for _ in range(n)]


def _prune(model, data, **kw):
    cfg = ts.ChannelPrune(ratio=0.5, round_to=1, skip_output_head=False, compensate=True, **kw)
    return ts.prune(model, cfg, calib_data=data, progress=False)


def _removed(before, after):
    kept = {int((before[0].weight == row).all(1).nonzero()) for row in after[0].weight}
    return torch.tensor(sorted(set(range(before[0].out_features)) - kept))


@pytest.mark.parametrize("importance", ["l1", "wanda", "taylor"])
def test_bias_takes_the_removed_mean_contribution(importance):
    model, data = _mlp(), _data()
    pruned = copy.deepcopy(model)
    _prune(pruned, data, importance=importance)
    removed = _removed(model, pruned)
    with torch.no_grad():
        h = torch.cat([torch.relu(model[0](x)) for x in data]).double()
    want = model[2].bias.double() + model[2].weight.double()[:, removed] @ h[:, removed].mean(0)
    assert torch.allclose(pruned[2].bias.double(), want.detach(), atol=1e-6)
    # the consumer is linear: the output's mean over the calibration rows does not move
    with torch.no_grad():
        mean_before = torch.cat([model(x) for x in data]).mean(0)
        mean_after = torch.cat([pruned(x) for x in data]).mean(0)
    assert torch.allclose(mean_after, mean_before, atol=1e-5)
    # without compensation it does
    plain = copy.deepcopy(model)
    ts.prune(plain, ts.ChannelPrune(ratio=0.5, round_to=1, skip_output_head=False, importance=importance),
             calib_data=data, progress=False)
    with torch.no_grad():
        assert not torch.allclose(torch.cat([plain(x) for x in data]).mean(0), mean_before, atol=1e-3)


def test_a_linear_without_bias_gets_one_that_saves_and_loads(tmp_path):
    model, data = _mlp(bias=False), _data()
    report = _prune(model, data)
    assert isinstance(model[2].bias, nn.Parameter) and model[2].bias.shape == (8,)
    row = next(c for c in report.changes if c.name == "2")
    assert "a bias added" in row.reason
    ts.save(model, tmp_path / "pruned.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "pruned.safetensors"), "pt") as f:  # readers without biases refuse it
        meta = f.metadata()
    assert meta["tensorslim.format_version"] == "3" and '"biases": ["2"]' in meta["tensorslim.pruning"]
    fresh = ts.load(_mlp(bias=False, seed=7), tmp_path / "pruned.safetensors")
    assert fresh[0].out_features == 16 and fresh[2].bias is not None
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))


def test_a_biasless_layer_that_loses_inputs_and_outputs_then_is_quantized(tmp_path):
    """The middle linear reads pruned channels and has its own pruned too: the bias compensate
    gives it keeps only its kept outputs (it was made full length before: the model failed to
    run); quantized afterwards, the file still loads back."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 24, bias=False),  # noqa: E731
                                 nn.ReLU(), nn.Linear(24, 8))
    model, data = make(), _data()
    dense = copy.deepcopy(model)
    _prune(model, data)
    assert model[2].weight.shape == (12, 16) and model[2].bias.shape == (12,)
    removed_in = _removed(dense, model)
    kept_out = sorted(int((dense[2].weight[:, [i for i in range(32) if i not in set(removed_in.tolist())]] == row)
                          .all(1).nonzero()) for row in model[2].weight)
    with torch.no_grad():
        h = torch.cat([torch.relu(dense[0](x)) for x in data]).double()
    want = dense[2].weight.double()[:, removed_in] @ h[:, removed_in].mean(0)
    assert torch.allclose(model[2].bias.double(), want[kept_out].detach(), atol=1e-6)
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    ts.save(model, tmp_path / "pq.safetensors")
    fresh = ts.load(make(), tmp_path / "pq.safetensors")
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))


def test_conv_consumers_are_not_compensated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 36, 5))
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    before = model[2].bias.detach().clone()
    ts.prune(model, ts.ChannelPrune(ratio=0.5, round_to=1, compensate=True, exclude=["2"]), calib_data=data,
             progress=False)
    assert model[0].out_channels == 4 and torch.equal(model[2].bias.detach(), before)


def test_compensate_needs_data_and_no_schedule():
    model = _mlp()
    with pytest.raises(ValueError, match="compensate=True needs calib_data or forward_loop"):
        ts.prune(model, ts.ChannelPrune(compensate=True), example_inputs=(torch.randn(2, 16),), progress=False)
    assert model[0].out_features == 32 and model[2].in_features == 32
    with pytest.raises(ValueError, match="compensate=True.*one-shot"):
        ts.pruning.Schedule(model, ts.ChannelPrune(compensate=True), 0, 4, 2, calib_data=_data())
    cfg = ts.ChannelPrune(ratio=0.3, importance="wanda", compensate=True)
    assert ts.Config.from_json(cfg.to_json()) == cfg
