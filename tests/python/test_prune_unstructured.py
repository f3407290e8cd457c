"""Unstructured pruning: the C++ cores against plain-PyTorch references on every ISA,
exact per-layer / global counts and thresholds, floors and ceilings, masks that survive
SGD / Adam / AdamW / weight decay and state_dict / ts.save round trips, finalize, summary,
and bad input leaving the model unchanged."""
import copy
import warnings

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.ops import prune as P
from tensorslim.pruning import masks


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48),
                         nn.ReLU(), nn.Linear(48, 10))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)
        self.head = nn.Linear(5, 2)  # an output head: skipped by default

    def forward(self, x):
        return self.head(self.fc(self.conv(x).mean((2, 3))))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        now[k].shape == state[k].shape and torch.equal(now[k].view(-1).view(torch.uint8), state[k].view(-1).view(torch.uint8))
        for k in state)  # bit for bit, NaN included


# ---------------------------------------------------------------- cores vs references


@pytest.mark.parametrize("p", [1, 2])
def test_cores_match_reference_on_every_isa(isa, p):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4099, generator=gen)
    w[::7] = -w[3::7][: w[::7].numel()]  # equal magnitudes: ties
    w[::11] = 0.0
    ref_s = P.scores(w, p, "reference")
    assert torch.equal(P.scores(w, p).view(torch.int32), ref_s.view(torch.int32))
    for k in (1, 100, 2050, 4099):
        t = P.kth_smallest(w, k, p)
        assert t == float(torch.kthvalue(ref_s.double(), k).values)  # exact, from a full sort
        got, want = P.keep_mask(w, k, t, p), P.keep_mask(w, k, t, p, "reference")
        assert torch.equal(got, want) and int((got == 0).sum()) == k
    for shift, nbits, prefix in ((21, 10, 0), (10, 11, int(ref_s.median().view(torch.int32)) >> 21)):
        assert torch.equal(P.score_histogram(w, shift, nbits, prefix, p),
                           P.score_histogram(w, shift, nbits, prefix, p, "reference"))


def test_gather_rows():
    w = torch.randn(10, 7)
    idx = torch.tensor([9, 0, 4])
    assert torch.equal(P.gather_rows(w, idx), w[idx])
    with pytest.raises(ValueError, match="out of range"):
        P.gather_rows(w, torch.tensor([10]))


# ---------------------------------------------------------------- magnitude / random


@pytest.mark.parametrize("norm", [1, 2])
def test_layer_scope_prunes_the_k_smallest_of_each_layer(norm):
    model = _mlp()
    ref = copy.deepcopy(model)
    report = ts.prune(model, ts.Magnitude(sparsity=0.8, norm=norm, skip_output_head=False), progress=False)
    assert len(report.changed) == 3
    for (name, m), r in zip(model.named_modules(), ref.modules()):
        if isinstance(m, nn.Linear):
            n = m.weight.numel()
            pruned = m.weight_mask == 0
            assert int(pruned.sum()) == round(0.8 * n)
            s = r.weight.detach().double().abs() ** norm
            assert s[pruned].max() <= s[~pruned].min()  # every pruned score <= every kept one
            assert torch.equal(m.weight, r.weight * m.weight_mask)


def test_global_scope_threshold_is_the_exact_kth_of_all_scores():
    model = _mlp()
    ref = copy.deepcopy(model)
    ts.prune(model, ts.Magnitude(sparsity=0.7, scope="global", skip_output_head=False), progress=False)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    refs = [m for m in ref.modules() if isinstance(m, nn.Linear)]
    allw = torch.cat([m.weight.detach().reshape(-1).abs() for m in refs])
    k = round(0.7 * allw.numel())
    t = float(torch.sort(allw).values[k - 1])
    from tensorslim.pruning.select import global_counts
    _, t_radix, _ = global_counts([m.weight for m in refs], 1, k, [0] * 3, [m.weight.numel() for m in refs])
    assert t_radix == t == float(torch.kthvalue(allw, k).values)  # exactly the k-th smallest
    assert sum(int((m.weight_mask == 0).sum()) for m in layers) == k
    for m, r in zip(layers, refs):
        s = r.weight.detach().abs()
        assert bool((s[m.weight_mask == 0] <= t).all()) and bool((s[m.weight_mask] >= t).all())
    per_layer = [float((m.weight_mask == 0).float().mean()) for m in layers]
    assert max(per_layer) - min(per_layer) > 0.05  # global ranking does not give uniform sparsity


@pytest.mark.parametrize("sparsity, want", [
    (0.5, (400, 1200)),  # layer 1 stops at its ceiling (0.75 n); layer 0 takes the rest
    (0.3, (320, 640)),   # layer 0 is held at its floor (0.2 n); layer 1 takes the rest
])
def test_global_floors_and_ceilings(sparsity, want):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40))
    with torch.no_grad():
        model[0].weight.mul_(100.0)  # every weight of layer 0 ranks above all of layer 1
    cfg = ts.Magnitude(sparsity=sparsity, scope="global", min_layer_sparsity=0.2, max_layer_sparsity=0.75,
                       skip_output_head=False)
    ts.prune(model, cfg, progress=False)
    got = (int((model[0].weight_mask == 0).sum()), int((model[1].weight_mask == 0).sum()))
    assert got == want and sum(got) == round(sparsity * 3200)


def test_global_bounds_match_brute_force():
    """Floors / ceilings: the radix selection equals a search over every threshold."""
    gen = torch.Generator().manual_seed(5)
    ws = [torch.randn(300, generator=gen) * s for s in (0.1, 1.0, 3.0)]
    from tensorslim.pruning.select import global_counts
    lo, hi, total = [30, 30, 30], [200, 200, 200], 450
    counts, t, _ = global_counts(ws, 1, total, lo, hi)
    scores = torch.cat([w.abs() for w in ws]).unique().sort().values
    best = None
    for u in scores.tolist():  # the largest score whose clamped count below it is < total
        f = sum(min(max(int((w.abs() < u).sum()), a), b) for w, a, b in zip(ws, lo, hi))
        if f < total:
            best = u
    assert t == best and sum(counts) == total
    assert all(a <= c <= b for c, a, b in zip(counts, lo, hi))


def test_random_prune_exact_and_reproducible():
    a, b = _mlp(), _mlp()
    ts.prune(a, ts.RandomPrune(sparsity=0.5, seed=3), progress=False)
    ts.prune(b, ts.RandomPrune(sparsity=0.5, seed=3), progress=False)
    assert all(torch.equal(x.weight_mask, y.weight_mask) for x, y in zip(a.modules(), b.modules())
               if masks.is_masked(x))
    assert int((a[0].weight_mask == 0).sum()) == round(0.5 * a[0].weight.numel())
    c = _mlp()
    ts.prune(c, ts.Magnitude(sparsity=0.5), progress=False)
    assert not torch.equal(a[0].weight_mask, c[0].weight_mask)


def test_conv_layers_and_output_head_skipped():
    model = ConvNet()
    report = ts.prune(model, ts.Magnitude(sparsity=0.5), progress=False)
    assert {c.name for c in report.changed} == {"conv", "fc"}
    assert [c.name for c in report.skipped] == ["head"]
    assert int((model.conv.weight == 0).sum()) == round(0.5 * model.conv.weight.numel())
    rows = {r.name: r for r in ts.summary(model).changes}
    assert rows["conv"].format == "50.0% sparse" and rows["head"].action == "skipped"


# ---------------------------------------------------------------- masks persist


def _train(model, opt, steps=5):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for m in model.modules():
            if masks.is_masked(m):
                assert bool((m.weight.grad[~m.weight_mask] == 0).all())  # pruned grads are zero
        opt.step()
        for m in model.modules():
            if masks.is_masked(m):  # checked right after the step, before any forward
                assert bool((m.weight[~m.weight_mask] == 0).all())


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["sgd_momentum_wd", "adam_l2", "adamw"])
def test_zeros_survive_optimizers_with_state_from_before_pruning(make_opt):
    model = _mlp()
    opt = make_opt(model.parameters())
    _train(model, opt, 3)  # momentum / Adam moments now non-zero everywhere
    ts.prune(model, ts.Magnitude(sparsity=0.6), progress=False)
    _train(model, opt, 5)
    assert int((model[0].weight == 0).sum()) >= round(0.6 * model[0].weight.numel())


def test_state_dict_round_trip_and_finalize():
    model = _mlp()
    ts.prune(model, ts.Magnitude(sparsity=0.5), progress=False)
    sd = copy.deepcopy(model.state_dict())
    other = _mlp(seed=1)
    ts.prune(other, ts.Magnitude(sparsity=0.9), progress=False)
    other.load_state_dict(sd)
    assert torch.equal(other[0].weight_mask, model[0].weight_mask)
    _train(other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), 3)
    x = torch.randn(4, 32)
    ts.pruning.finalize(other)
    assert not any(masks.is_masked(m) for m in other.modules())
    assert "0.weight_mask" not in other.state_dict()
    assert other.state_dict().keys() == _mlp().state_dict().keys()
    zeros = other[0].weight == 0
    assert int(zeros.sum()) >= round(0.5 * other[0].weight.numel())
    other(x).sum().backward()
    assert bool((other[0].weight.grad[zeros] != 0).any())  # machinery gone: gradients flow


def test_save_load_into_fresh_model(tmp_path):
    model = _mlp()
    ts.prune(model, ts.Magnitude(sparsity=0.75, scope="global"), progress=False)
    path = tmp_path / "pruned.slim.safetensors"
    ts.save(model, path)
    fresh = _mlp(seed=2)
    ts.load(fresh, path)
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))
    assert masks.is_masked(fresh[0]) and torch.equal(fresh[0].weight_mask, model[0].weight_mask)
    _train(fresh, torch.optim.Adam(fresh.parameters(), lr=0.01), 2)  # still kept at zero


def test_save_load_bad_file_leaves_model_unchanged(tmp_path):
    model = _mlp()
    ts.prune(model, ts.Magnitude(sparsity=0.5), progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    wrong = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 49), nn.ReLU(), nn.Linear(49, 10))
    before = _state(wrong)
    with pytest.raises(ValueError, match="does not match"):
        ts.load(wrong, path)
    assert _same(wrong, before) and not any(masks.is_masked(m) for m in wrong.modules())


# ---------------------------------------------------------------- configs and bad input


def test_config_json_round_trip():
    for cfg in (ts.Magnitude(sparsity=0.8, scope="global", norm=2, max_layer_sparsity=0.95, exclude="fc*"),
                ts.RandomPrune(sparsity=0.3, seed=7)):
        assert ts.Config.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(sparsity="0.5"), "sparsity must be a number"),
    (dict(scope="model"), "scope must be"),
    (dict(norm=3), "norm must be"),
    (dict(sparsity=0.5, min_layer_sparsity=0.6), "min_layer_sparsity <= sparsity"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ts.Magnitude(**kwargs)


def test_nan_weight_names_layer_and_model_unchanged():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"layer '2'.*NaN"):
        ts.prune(model, ts.Magnitude(sparsity=0.5, scope="global"), progress=False)
    assert _same(model, before) and not any(masks.is_masked(m) for m in model.modules())
    with pytest.raises(TypeError, match="pruning config"):
        ts.prune(model, ts.Int8WeightOnly())


def test_ops_pass_opcheck_and_run_on_meta():
    w = torch.randn(257)
    torch.library.opcheck(torch.ops.tensorslim.prune_scores.default, (w, 2))
    torch.library.opcheck(torch.ops.tensorslim.kth_smallest.default, (w, 1, 100))
    torch.library.opcheck(torch.ops.tensorslim.prune_mask.default, (w, 1, 0.5, 100))
    torch.library.opcheck(torch.ops.tensorslim.score_histogram.default, (w, 1, 21, 10, 0))
    meta = torch.empty(64, device="meta")
    assert torch.ops.tensorslim.prune_mask(meta, 1, 0.5, 3).shape == (64,)
    assert torch.ops.tensorslim.score_histogram(meta, 1, 21, 10, 0).shape == (1024,)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("shift, nbits", [(2 ** 31 - 1, 10), (23, 10), (-1, 8), (0, 0), (0, 40)])
def test_histogram_bit_fields_outside_the_score_are_refused(backend, shift, nbits):
    """shift + nbits overflowed int in the core's check (2^31 - 1 passed, then an undefined
    shift gave a garbage histogram); nbits = 40 allocated 2^40 bins before any check."""
    with pytest.raises(ValueError, match="nbits"):
        P.score_histogram(torch.randn(100), shift, nbits, 0, 1, backend)


def test_pruning_or_factorizing_a_quantized_model_says_why_nothing_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    for verb, cfg in ((ts.prune, ts.Magnitude(sparsity=0.5)), (ts.factorize, ts.SVD(rank=8))):
        with pytest.warns(UserWarning, match="2 layers skipped: already compressed"):
            report = verb(model, cfg, progress=False)
        assert [c.name for c in report.skipped] == ["0", "2"]


def test_pruning_again_at_a_lower_sparsity_warns_that_weights_come_back():
    """A 90% layer pruned to 60%: the new mask keeps 30% of weights that are zero now and train
    again (the report still counted them as zeros): said; pruning further says nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    ts.prune(model, ts.Magnitude(sparsity=0.8, skip_output_head=False), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.prune(model, ts.Magnitude(sparsity=0.9, skip_output_head=False), progress=False)
    with pytest.warns(UserWarning, match=r"keep weights that earlier pruning removed.*0 \(1228\)"):
        ts.prune(model, ts.Magnitude(sparsity=0.6, skip_output_head=False), progress=False)
