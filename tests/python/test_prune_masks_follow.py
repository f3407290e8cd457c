"""Pruned weights stay at zero in a deep copy of a pruned model and in the QAT layer that takes
over a pruned weight: the gradient hook and the optimizer hook follow the weight the module
holds now (a copy's own, not the original's)."""
import copy

import torch
from torch import nn

import tensorslim as ts
from tensorslim.pruning import masks


def _pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    ts.prune(model, ts.Magnitude(sparsity=0.5), progress=False)
    return model


def _adam_steps(model, n=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(n):
        opt.zero_grad()
        model(torch.randn(8, 32)).square().sum().backward()
        opt.step()


def test_a_deep_copy_keeps_its_pruned_weights_at_zero():
    model = _pruned()
    pruned = ~model[0].weight_mask
    twin = copy.deepcopy(model)
    _adam_steps(twin)
    assert int(twin[0].weight[pruned].count_nonzero()) == 0  # after the last step: no forward since
    assert twin[0].weight[~pruned].count_nonzero() > 0
    _adam_steps(model)  # the original is still guarded too
    assert int(model[0].weight[pruned].count_nonzero()) == 0


def test_finalizing_a_copy_leaves_the_original_pruned():
    model = _pruned()
    twin = copy.deepcopy(model)
    ts.pruning.finalize(twin)
    assert not masks.is_masked(twin[0]) and masks.is_masked(model[0]) and masks.is_masked(model[2])
    pruned = ~model[0].weight_mask
    _adam_steps(model)
    assert int(model[0].weight[pruned].count_nonzero()) == 0


def test_qat_on_a_pruned_model_keeps_the_pruned_weights_at_zero():
    model = _pruned()
    pruned = ~model[0].weight_mask
    ts.prepare_qat(model, ts.Int4WeightOnly(group_size=32), progress=False)
    assert masks.is_masked(model[0])
    _adam_steps(model)  # raised AttributeError from the old layer's hook
    assert int(model[0].weight[pruned].count_nonzero()) == 0
    ts.convert(model)
    assert int(model[0].dequantized_weight()[pruned].count_nonzero()) == 0
