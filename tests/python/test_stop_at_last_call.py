"""Statistics passes end the block's forward at the last target call they need
(blockwise.StopAtLastCall): the statistics stay those of whole passes, and the rest of the
block runs only where it must."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.quantization import blockwise, gptq
from tensorslim.sparsity import calibrated

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Counted(nn.Module):
    """Counts its calls: what runs after the last target."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(x)


class Chain(nn.Module):
    """q and k read one input, o reads their product, `rare` runs only on batches whose mean
    exceeds `threshold`, then a tail. `guarded` runs rare inside `try / except Exception`."""

    def __init__(self, threshold=-float("inf"), guarded=False):
        super().__init__()
        self.q, self.k, self.o, self.rare = (nn.Linear(32, 32) for _ in range(4))
        self.tail = Counted()
        self.threshold, self.guarded = threshold, guarded

    def forward(self, x):
        h = self.o(torch.relu(self.q(x)) * self.k(x))
        if float(x.mean()) > self.threshold:
            if self.guarded:
                try:
                    h = h + self.rare(h)
                except Exception:  # a block's own error handling must not catch the stop
                    h = h * 0
            else:
                h = h + self.rare(h)
        return x + self.tail(h)


def forward_calls(mod):
    calls = []
    mod.register_forward_hook(lambda m, a, out: calls.append(1))  # runs only if forward ran
    return calls


def reference_inputs(block, inputs):
    """Every target's inputs over whole passes, recorded with plain forward hooks."""
    seen = {n: [] for n in ("q", "k", "o", "rare")}
    hs = [getattr(block, n).register_forward_hook(lambda m, a, out, n=n: seen[n].append(a[0].double()))
          for n in seen]
    with torch.no_grad():
        for (args, kwargs) in inputs:
            block(*args, **kwargs)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v}


def batches(means):
    gen = torch.Generator().manual_seed(0)
    return [((torch.randn(8, 32, generator=gen) + m,), {}) for m in means]


def assert_hessians(stats, ref, names):
    for n in names:
        x = ref[n]
        want = 2 * x.T @ x / x.shape[0]
        assert torch.allclose(stats.hessians[n], want, rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("guarded", [False, True])
def test_hessian_pass_stops_after_the_last_target_it_needs(guarded):
    torch.manual_seed(0)
    block = Chain(guarded=guarded)
    inputs = batches([0.0] * 4)
    ref = reference_inputs(block, inputs)
    block.tail.calls = 0
    rare_calls = forward_calls(block.rare)
    targets = {n: getattr(block, n) for n in ("q", "k", "o", "rare")}
    stats = gptq.accumulate_hessians(block, targets, inputs)
    assert_hessians(stats, ref, targets)
    # The first batch runs whole; later ones stop before rare's product and the tail.
    assert block.tail.calls == 1 and len(rare_calls) == 1


def test_first_group_pass_stops_before_the_later_layers():
    torch.manual_seed(1)
    block = Chain()
    inputs = batches([0.0] * 3)
    ref = reference_inputs(block, inputs)
    o_calls = forward_calls(block.o)
    targets = {n: getattr(block, n) for n in ("q", "k", "o", "rare")}
    stats = gptq.accumulate_hessians(block, targets, inputs, first_only=True)
    assert set(stats.hessians) == {"q", "k"} and sorted(stats.first) == ["k", "q"]
    assert_hessians(stats, ref, ["q", "k"])
    assert len(o_calls) == 1


def test_a_layer_missing_from_the_first_batch_keeps_whole_passes():
    """rare does not run on the first batch: a later batch may still call it after every
    layer the first batch saw, so no batch may stop early."""
    torch.manual_seed(2)
    block = Chain(threshold=5.0)
    inputs = batches([0.0, 10.0, 10.0, 0.0])
    ref = reference_inputs(block, inputs)
    block.tail.calls = 0
    targets = {n: getattr(block, n) for n in ("q", "k", "o", "rare")}
    stats = gptq.accumulate_hessians(block, targets, inputs)
    assert_hessians(stats, ref, targets)
    assert block.tail.calls == 4


def test_wanda_norms_stop_after_the_last_target():
    torch.manual_seed(3)
    block = Chain()
    inputs = batches([0.0] * 3)
    ref = reference_inputs(block, inputs)
    block.tail.calls = 0
    targets = {n: getattr(block, n) for n in ("q", "o", "rare")}
    norms, means = calibrated._input_stats(block, targets, inputs, with_means=True)  # bias correction's too
    for n in targets:
        assert torch.allclose(norms[n], ref[n].pow(2).sum(0).sqrt(), rtol=1e-6), n
        assert torch.allclose(means[n], ref[n].mean(0), rtol=1e-6, atol=1e-9), n
    assert block.tail.calls == 1


def test_reach_check_stops_within_the_first_batch():
    block = Chain()
    rare_calls = forward_calls(block.rare)
    targets = {n: getattr(block, n) for n in ("q", "o", "rare")}
    assert blockwise.reached_targets(block, targets, batches([0.0] * 3)) == set(targets)
    assert block.tail.calls == 0 and not rare_calls  # stopped as rare was called


@pytest.mark.parametrize("cfg", [ts.Int4WeightOnly(group_size=32, algorithm="gptq"),
                                 ts.GPTQ(bits=4, group_size=32, fit_float_outputs=True),  # group by group
                                 ts.NM(2, 4, method="sparsegpt"), ts.Unstructured(0.5, method="wanda")])
def test_results_equal_those_of_whole_passes(cfg, monkeypatch):
    torch.manual_seed(4)
    model = nn.Sequential(Chain(), Chain())
    calib = [torch.randn(8, 32) + 0.1 * i for i in range(4)]
    early, whole = copy.deepcopy(model), copy.deepcopy(model)
    verb = ts.sparsify if isinstance(cfg, (ts.NM, ts.Unstructured)) else ts.quantize
    verb(early, cfg, calib_data=calib, progress=False)
    monkeypatch.setattr(blockwise.StopAtLastCall, "first_batch_done", lambda self, needed: None)
    verb(whole, cfg, calib_data=calib, progress=False)
    a, b = early.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
