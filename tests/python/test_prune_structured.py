"""ChannelPrune on a ResNet-style CNN (residual adds, BatchNorm, depthwise convs, a
concatenation): layers really shrink, FLOPs drop >= 50%, the pruned model computes exactly
what the original computes with the removed channels' consumer columns zeroed, it fine-tunes
back, saves / loads into a fresh model; bad input leaves the model unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.eval import digits_cnn as D
from tensorslim.pruning import channels as C
from pruned_reference import zeroed_reference

pytest.importorskip("sklearn", reason="needs scikit-learn's digits")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return D.digits()


@pytest.fixture(scope="module")
def trained(data):
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    return D.train(D.DigitsResNet(), xtr, ytr, steps=80)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(now[k].shape == state[k].shape and torch.equal(now[k], state[k])
                                              for k in state)


def test_cnn_channel_pruning_flops_equivalence_finetune(trained, data, tmp_path):
    xtr, ytr, xte, yte = data
    model = copy.deepcopy(trained)
    cfg = ts.ChannelPrune(ratio=0.5, importance="l1")
    ref, _ = zeroed_reference(model, cfg, (xtr[:4],))
    report = ts.prune(model, cfg, calib_data=[xtr[:16]], progress=False)
    assert model.block2.conv.weight.shape == (32, 32, 3, 3) and model.block2.dw.groups == 32
    assert model.bn_cat.num_features == 32 and model.head.in_features == 32
    assert model.branch_a.out_channels + model.branch_b.out_channels == 32
    assert {c.name for c in report.changed} >= {"stem", "down", "block1.dw", "head"}
    rows = {r.name: r for r in ts.summary(model).changes}
    assert rows["block1.dw"].reason == "groups=16, in_channels=16, out_channels=16"
    f0, f1 = D.flops(trained, xte[:1]), D.flops(model, xte[:1])
    assert f1 <= 0.5 * f0, (f0, f1)
    with torch.no_grad():
        assert torch.allclose(model(xte[:64]), ref.eval()(xte[:64]), atol=1e-4, rtol=1e-4)
    acc_dense = D.accuracy(trained, xte, yte)
    D.train(model, xtr, ytr, steps=100, lr=2e-3, seed=1)
    acc_pruned = D.accuracy(model, xte, yte)
    print(f"\ndigits CNN: FLOPs {f0} -> {f1} ({1 - f1 / f0:.1%} removed), accuracy dense {acc_dense:.3f}, "
          f"pruned + 100-step fine-tune {acc_pruned:.3f}")
    assert acc_dense > 0.9 and acc_pruned > 0.85  # chance is 0.1
    path = tmp_path / "cnn.slim.safetensors"
    ts.save(model, path)
    fresh = D.DigitsResNet()
    ts.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(xte[:32]), model(xte[:32]))
    assert fresh.block3.dw.groups == 32 and fresh.head.in_features == 32


@pytest.mark.parametrize("importance", ["l2", "random", "taylor", "wanda"])
def test_other_importances(trained, data, importance):
    xtr, ytr, _, _ = data
    model = copy.deepcopy(trained)
    cfg = ts.ChannelPrune(ratio=0.25, importance=importance)
    ts.prune(model, cfg, calib_data=[(xtr[:32],)], progress=False)
    assert model.block2.conv.out_channels == 48 and model.stem.out_channels == 24


def test_taylor_needs_data_and_orders_differ(trained, data):
    xtr = data[0]
    with pytest.raises(ValueError, match="taylor.*calib_data or forward_loop"):
        ts.prune(copy.deepcopy(trained), ts.ChannelPrune(importance="taylor"), example_inputs=xtr[:2])
    m = copy.deepcopy(trained)
    spaces = C.build_spaces(m, ts.ChannelPrune(), None, (xtr[:2],))
    before = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    grads = C.taylor_grads(m, [xtr[:64]], None)
    for n, p in m.named_parameters():  # the model's own .grad fields are restored
        assert (p.grad is None and before[n] is None) or torch.equal(p.grad, before[n])
    root = next(s for s in spaces.roots().values() if "block2.conv" in s.producers)
    l1 = C._channel_scores(root, dict(m.named_modules()), ts.ChannelPrune(importance="l1"), None, 0)
    ty = C._channel_scores(root, dict(m.named_modules()), ts.ChannelPrune(importance="taylor"), grads, 0)
    w = m.block2.conv.weight.detach().double()
    want = w.abs().sum((1, 2, 3)) + m.block2.bn1.weight.detach().double().abs() + \
        m.block2.bn1.bias.detach().double().abs() + m.block2.dw.weight.detach().double().abs().sum((1, 2, 3)) + \
        m.block2.bn2.weight.detach().double().abs() + m.block2.bn2.bias.detach().double().abs() + \
        m.block2.pw.weight.detach().double().abs().sum((0, 2, 3))
    assert torch.allclose(l1, want)  # the group's l1: every coupled slice, summed
    assert not torch.equal(torch.argsort(l1), torch.argsort(ty))


# ---------------------------------------------------------------- bad input


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3)
        self.g = nn.Conv2d(8, 8, 3, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.g(F.relu(self.a(x))).mean((2, 3)))


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (4 groups) -> BatchNorm -> 1x1, the ResNeXt bottleneck."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.reduce = nn.Conv2d(1, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.g(F.relu(self.reduce(x)))))
        return self.fc(self.expand(y).mean((2, 3)))


@pytest.mark.parametrize("make", [Grouped, ResNeXtBlock])
def test_grouped_conv_filters_pruned_per_group(make):
    """A grouped conv loses as many filters from each group (out_channels stays a multiple of
    groups) and keeps its inputs, so the layer feeding it is reported as skipped."""
    model = make().eval()
    x = torch.rand(2, 1, 8, 8)
    cfg = ts.ChannelPrune(ratio=0.5, round_to=1)
    ref, _ = zeroed_reference(model, cfg, (x,))
    spaces = C.build_spaces(model, cfg, None, (x,))
    removed, _, _ = C.plan(model, spaces, cfg, None)
    dropped = removed[("g", "weight", 0)]
    per_group = model.g.out_channels // model.g.groups
    assert [sum(1 for i in dropped if i // per_group == j) for j in range(model.g.groups)] == \
        [per_group // 2] * model.g.groups
    first = "a" if make is Grouped else "reduce"
    report = ts.prune(model, cfg, example_inputs=x, progress=False)
    g = model.g
    assert g.out_channels == g.weight.shape[0] == (4 if make is Grouped else 8)
    assert g.in_channels == g.weight.shape[1] * g.groups == (8 if make is Grouped else 16)
    if make is ResNeXtBlock:  # BatchNorm follows the filters; the next 1x1 loses their columns
        assert model.bn.num_features == 8 and model.expand.in_channels == 8
    rows = {c.name: c for c in report.changes}
    assert rows[first].action == "skipped" and "grouped conv 'g'" in rows[first].reason
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


class DataDependent(nn.Module):
    """Control flow on values: fx cannot trace it, the autograd graph of one pass can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 36, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        if y.sum() > 0:
            y = y + self.b(y)
        return self.fc(y.flatten(1))


class Untraceable(DataDependent):
    """Data-dependent and its output is not differentiable: neither tracer sees a graph."""

    def forward(self, x):
        return super().forward(x).argmax(1)


def test_autograd_fallback_prunes_a_model_fx_cannot_trace():
    model = DataDependent().eval()
    x = torch.rand(4, 1, 8, 8)
    cfg = ts.ChannelPrune(ratio=0.5, round_to=1)
    with pytest.raises(ValueError, match="does not trace with torch.fx"):
        C.channel_graph.trace(model, (x,))
    ref, _ = zeroed_reference(model, cfg, (x,))
    ts.prune(model, cfg, example_inputs=x, progress=False)
    # a -> bn -> (+ b) residual group: 8 of 16 channels, flattened 36 features each into fc
    assert model.a.out_channels == 8 and model.b.out_channels == 8 and model.fc.in_features == 8 * 36
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("make, cfg, kwargs, match", [
    (D.DigitsResNet, ts.ChannelPrune(ratio=0.99, round_to=1), {}, r"layer '.*': ratio 0.99 leaves 0"),
    (Untraceable, ts.ChannelPrune(ratio=0.5), {}, "traces neither with torch.fx nor through autograd"),
    (D.DigitsResNet, ts.ChannelPrune(ratio=0.5), {"no_inputs": True}, "needs example inputs"),
])
def test_bad_input_leaves_model_unchanged(make, cfg, kwargs, match):
    torch.manual_seed(0)
    model = make()
    before = _state(model)
    args = {} if kwargs.get("no_inputs") else {"example_inputs": torch.rand(2, 1, 8, 8)}
    with pytest.raises(ValueError, match=match):
        ts.prune(model, cfg, progress=False, **args)
    assert _same(model, before)
    assert not hasattr(model, C.STRUCTURED_ATTR)


def test_config_errors():
    for kwargs, match in ((dict(ratio=1.0), "ratio must be in"), (dict(importance="hessian"), "importance"),
                          (dict(round_to=0), "round_to"), (dict(head_ratio="all"), "head_ratio")):
        with pytest.raises(ValueError, match=match):
            ts.ChannelPrune(**kwargs)
    cfg = ts.ChannelPrune(ratio=0.3, importance="taylor", head_ratio=0.25, exclude=["stem"])
    assert ts.Config.from_json(cfg.to_json()) == cfg


def test_excluded_producer_keeps_its_group(trained, data):
    model = copy.deepcopy(trained)
    ts.prune(model, ts.ChannelPrune(ratio=0.5, exclude=["block2.pw"]), calib_data=[data[0][:4]], progress=False)
    # block2.pw is in the stage-2 residual group: the whole group keeps its 64 channels
    assert model.block2.pw.out_channels == 64 and model.down.out_channels == 64
    assert model.block2.conv.out_channels == 32  # block-internal groups still pruned


def test_taylor_ranks_channels_no_gradient_reaches_by_l1():
    """A branch the calibration data never takes has no gradient: its channels (zero taylor
    importance, else pruned in index order) are ranked by l1 instead, with a warning; the
    branch that ran keeps taylor's choice."""
    class Branchy(nn.Module):
        """b's path is traced but weighs zero on inputs this small (a gate no calibration batch opens)."""

        def __init__(self):
            super().__init__()
            self.a1, self.a2 = nn.Linear(16, 32), nn.Linear(32, 16)
            self.b1, self.b2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            gate = (x.abs().amax() > 100).to(x.dtype)
            return self.a2(torch.relu(self.a1(x))) + gate * self.b2(torch.relu(self.b1(x)))

    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(8, 16)
    by_l1 = copy.deepcopy(model)
    cfg = ts.ChannelPrune(ratio=0.5, importance="taylor", skip_output_head=False)
    with pytest.warns(UserWarning, match=r"gradients never reached the channels of \['b1'\].*l1"):
        ts.prune(model, cfg, example_inputs=x, calib_data=[x], progress=False)
    ts.prune(by_l1, ts.ChannelPrune(ratio=0.5, importance="l1", skip_output_head=False), example_inputs=x,
             progress=False)
    assert model.b1.out_features == 16 and torch.equal(model.b1.weight, by_l1.b1.weight)
    assert not torch.equal(model.a1.weight, by_l1.a1.weight)


def test_taylor_gradients_of_frozen_parameters_count(trained, data):
    """Frozen for training is not unimportant: with part or all of the model frozen the Taylor
    gradients are those of the trainable model (they were zeros, or backward raised), and each
    parameter's requires_grad comes back."""
    xtr = data[0]
    want = C.taylor_grads(copy.deepcopy(trained), [xtr[:64]], None)
    for freeze in ("block2", ""):
        m = copy.deepcopy(trained)
        for n, p in m.named_parameters():
            if n.startswith(freeze):
                p.requires_grad_(False)
        flags = {n: p.requires_grad for n, p in m.named_parameters()}
        got = C.taylor_grads(m, [xtr[:64]], None)
        assert all(torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7) for n in want), freeze
        assert {n: p.requires_grad for n, p in m.named_parameters()} == flags


def test_summary_gives_the_size_before_channels_were_removed():
    """ts.summary's rows for channel-pruned layers: the size before pruning (it printed the new
    size twice), as the prune's own Report; pruning again keeps the first size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(32, 64)
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, importance="l2"), calib_data=[x], progress=False)
    rows = {c.name: (c.bytes_before, c.bytes_after) for c in ts.summary(model).changed}
    assert rows == {c.name: (c.bytes_before, c.bytes_after) for c in report.changed}
    ts.prune(model, ts.ChannelPrune(ratio=0.5, importance="l2"), calib_data=[x], progress=False)
    again = {c.name: c.bytes_before for c in ts.summary(model).changed}
    assert again == {n: b for n, (b, _) in rows.items()} and model[0].out_features == 128
