"""Pruned weights stay at zero in a deep copy of a pruned model and in the QAT layer that takes
over a pruned weight: the gradient hook and the optimizer hook follow the weight the module
holds now (a copy's own, not the original's)."""
import copy

import pytest
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
    checkpoint = copy.deepcopy(model.state_dict())  # QAT's training checkpoint: torch's state_dict
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    ts.prepare_qat(fresh, ts.Int4WeightOnly(group_size=32), progress=False)
    fresh.load_state_dict(checkpoint)  # refused its weight_mask keys before
    assert masks.is_masked(fresh[0]) and torch.equal(fresh[0].weight_mask, ~pruned)
    ts.convert(model)
    assert int(model[0].dequantized_weight()[pruned].count_nonzero()) == 0


def test_forwards_before_one_backward_still_backpropagate():
    """The forward pre-hook re-masks without bumping the weight's version: two forwards (or a
    shared layer, or a no_grad forward) before one backward must not break the first graph."""
    model = _pruned()
    x1, x2 = torch.randn(4, 32), torch.randn(4, 32)
    (model(x1).sum() + model(x2).sum()).backward()
    loss = model(x1).sum()
    with torch.no_grad():
        model(x2)
    loss.backward()
    dense = copy.deepcopy(model)
    ts.pruning.finalize(dense)
    for m in (model, dense):
        m.zero_grad()
        (m(x1).sum() + m(x2).sum()).backward()
    assert torch.equal(model[0].weight.grad, dense[0].weight.grad * model[0].weight_mask)
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # edited by hand: the next forward masks it again
    model(x1)
    assert int(model[0].weight[~model[0].weight_mask].count_nonzero()) == 0


def test_frozen_weights_can_be_pruned_and_guarded_once_unfrozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    model[0].weight.requires_grad_(False)
    ts.prune(model, ts.Magnitude(sparsity=0.5), progress=False)  # raised, half pruned, before
    pruned = ~model[0].weight_mask
    assert int(model[0].weight[pruned].count_nonzero()) == 0 and model[2].weight_mask.sum() == 512
    frozen_copy = copy.deepcopy(model).requires_grad_(False)  # an EMA / teacher copy
    assert torch.equal(frozen_copy(torch.ones(2, 32)), model(torch.ones(2, 32)))
    model[0].weight.requires_grad_(True)
    _adam_steps(model)  # the first forward's pre-hook hooks the now trainable weight
    assert int(model[0].weight[pruned].count_nonzero()) == 0
    assert model[0].weight.grad[pruned].abs().max() == 0


def test_functional_call_leaves_the_callers_tensors_alone():
    """torch.func.functional_call with plain tensors: used as given; the pre-hook zeroed the
    caller's tensors in place (EMA / meta-learning weights) before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ts.prune(model, ts.Magnitude(sparsity=0.5, skip_output_head=False), progress=False)
    dense = {k: v.detach() + 1.0 for k, v in model.named_parameters()}
    before = {k: v.clone() for k, v in dense.items()}
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="used as given, its mask not applied"):
        out = torch.func.functional_call(model, dense, (x,))
    assert all(torch.equal(dense[k], before[k]) for k in dense)
    ref = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ref.load_state_dict(before)
    assert torch.allclose(out, ref(x), atol=1e-6)
    # The model's own masked weights still apply outside the call.
    assert int((model[0].weight == 0).sum()) == 256
    masked = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.warns(UserWarning):
        assert torch.allclose(torch.func.functional_call(model, masked, (x,)), model(x), atol=1e-6)


def test_compression_verbs_apply_the_masks_of_weights_changed_since_pruning():
    """A pruned layer whose weight was loaded dense afterwards (strict=False) and not run since:
    the verbs read the weight directly and compressed the dense model (int8 0.68 off the
    pruned model's own output)."""
    for verb in (lambda m: ts.quantize(m, "int8", progress=False),
                 lambda m: ts.sparsify(m, ts.Unstructured(0.5), progress=False),
                 lambda m: ts.factorize(m, ts.SVD(ratio=0.9), progress=False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        ts.prune(model, ts.Magnitude(sparsity=0.8, skip_output_head=False), progress=False)
        model.load_state_dict(dense, strict=False)  # the masks stay; the weights are dense again
        keep = model[0].weight_mask.clone()
        verb(model)
        w = model[0].weight.detach()
        pruned_w = dense["0.weight"] * keep
        # The compressed layer approximates the pruned weight, not the dense one.
        assert (w - pruned_w).norm() < 0.5 * (w - dense["0.weight"]).norm()
