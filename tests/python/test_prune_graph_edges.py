"""ChannelPrune on graph patterns its channel graph must not misread: each either prunes
correctly (the pruned model equals the original with the removed channels zeroed) or keeps
the affected channels / raises a clear error with the model unchanged. Before these checks
some gave a wrong model silently (a residual written torch.add(x, other=y), a head tied to
the embedding untied) and others a model that no longer ran."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import tensorslim as ts
from tensorslim.pruning import channels as C

from pruned_reference import zeroed_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = ts.ChannelPrune(ratio=0.5, round_to=1)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


class KeywordAdd(nn.Module):
    def __init__(self, method: bool):
        super().__init__()
        self.method = method
        self.stem, self.a, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = x.add(other=self.a(x)) if self.method else torch.add(x, other=self.a(x))
        return self.head(F.relu(input=y))


@pytest.mark.parametrize("method", [False, True])
def test_residual_written_with_keywords_keeps_channels_aligned(method):
    torch.manual_seed(0)
    model, x = KeywordAdd(method).eval(), torch.randn(2, 3, 8, 8)
    ref, _ = zeroed_reference(model, CFG, (x,))
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model.stem.out_channels == model.a.out_channels == 8 and model.head.in_channels == 8
    with torch.no_grad():  # before: the two branches kept different channels (0.31 off on outputs of 0.68)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.fc2(F.relu(self.fc1(self.emb(ids)))))


def test_head_tied_to_the_embedding_stays_tied():
    torch.manual_seed(0)
    model, ids = TiedHead().eval(), torch.randint(0, 50, (2, 6))
    report = ts.prune(model, CFG, example_inputs=(ids,), progress=False)
    assert model.head.weight is model.emb.weight and model.head.in_features == 16
    assert model.fc1.out_features == 16 and model.fc2.in_features == 16  # the untied space still prunes
    assert "shares a weight" in " ".join(c.reason for c in report.changes)


class ParamAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)
        self.b = nn.Parameter(torch.randn(32))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x) + self.b))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.conv(F.relu(self.conv(F.relu(self.stem(x))))))


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), parametrizations.weight_norm(nn.Linear(32, 32)), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ResidualInput(nn.Module):  # (B, T, D) input added back: a pre-norm transformer's MLP
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(x + self.fc2(F.relu(self.fc1(x))))


@pytest.mark.parametrize("make, x, kept", [
    (ParamAdd, torch.randn(4, 8), ["fc1"]),         # a learned bias added to fc1's output
    (WeightNormed, torch.randn(4, 8), ["fc1"]),      # fc2's weight is computed by a parametrization
    (ResidualInput, torch.randn(2, 5, 16), ["fc2"]),  # the input's width, added to fc2's output
])
def test_patterns_that_keep_their_channels(make, x, kept):
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        before = model(x)
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    mods = dict(model.named_modules())
    for name in kept:  # outputs kept (before: pruned on one side only, and the model no longer ran)
        assert mods[name].weight.shape[0] == make().get_submodule(name).weight.shape[0]
    with torch.no_grad():
        assert model(x).shape == before.shape


class Siamese(nn.Module):
    """One tower (conv, BatchNorm, conv) run on two images, its outputs compared: the tower's
    layers are called twice."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 2)

    def tower(self, x):
        return F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return self.head(self.tower(a) - self.tower(b))


class SharedOnTwoWidths(nn.Module):  # one conv reads a 16-channel stem, then a 16-wide other layer
    def __init__(self):
        super().__init__()
        self.stem, self.side = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 1)
        self.conv, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([self.conv(F.relu(self.stem(x))), self.conv(self.side(x) * x.mean())], 1))


@pytest.mark.parametrize("make, x, sizes", [
    (Shared, torch.randn(2, 3, 8, 8), {"stem": 8, "conv": 8}),  # conv(conv(stem)): one space throughout
    (Siamese, torch.randn(2, 6, 8, 8), {"c1": 8, "bn": 8, "c2": 16}),
    (SharedOnTwoWidths, torch.randn(2, 3, 8, 8), {"stem": 8, "side": 8, "conv": 8}),
])
def test_shared_layers_lose_the_same_channels_in_every_call(make, x, sizes):
    """A layer called several times has one weight: every call's inputs are its columns (the
    producers of each call's input lose the same channels) and every call's output its rows.
    Before, the calls' channels were kept whole."""
    torch.manual_seed(0)
    model = make().eval()
    if hasattr(model, "bn"):
        with torch.no_grad():
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
    ref, _ = zeroed_reference(model, CFG, (x,))
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    mods = dict(model.named_modules())
    assert {n: mods[n].weight.shape[0] for n in sizes} == sizes
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class SharedOnUnknown(nn.Module):  # the second call reads a tensor the graph does not follow
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(32, 4, 1)
        self.table = nn.Parameter(torch.randn(1, 16, 8, 8))

    def forward(self, x):
        return self.head(torch.cat([self.conv(F.relu(self.stem(x))), self.conv(self.table.expand(len(x), -1, -1, -1))], 1))


def test_a_shared_layer_on_an_unknown_input_keeps_its_channels():
    torch.manual_seed(0)
    model, x = SharedOnUnknown().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    report = ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model.stem.out_channels == 16 and model.conv.weight.shape == (16, 16, 1, 1)
    assert any("runs 2 times (shared weights) on inputs that do not line up" in c.reason for c in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


class FlattenBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm1d(8 * 4 * 4), nn.Linear(8 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.c(x).flatten(1)))


class PoolFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.pool, self.fc2 = nn.Linear(8, 32), nn.AvgPool1d(2), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.pool(F.relu(self.fc1(x))))


@pytest.mark.parametrize("importance", ["l1", "random"])
@pytest.mark.parametrize("make, x, match", [
    (FlattenBatchNorm, torch.randn(2, 3, 6, 6), "BatchNorm 'bn' normalizes a dimension other than the channels"),
    (PoolFeatures, torch.randn(2, 5, 8), "pooling 'pool' runs over the channel dimension"),
])
def test_unsupported_patterns_keep_their_channels_with_why(make, x, match, importance):
    model = make().eval()
    state = _state(model)
    with pytest.warns(UserWarning, match="nothing was compressed"):
        report = ts.prune(model, ts.ChannelPrune(ratio=0.5, round_to=1, importance=importance),
                          example_inputs=(x,), progress=False)
    assert any(c.reason.startswith("channels: cannot be pruned consistently: " + match) for c in report.skipped)
    assert _unchanged(model, state)


class DetachedConsumer(nn.Module):  # data-dependent flow: the autograd fallback traces it
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        if x.sum() > -1e9:
            h = F.relu(self.c1(x))
        return self.c2(h) + self.c3(h.detach())  # c3 is not in the backward graph


def test_a_misread_graph_is_caught_by_the_check_and_undone():
    model, x = DetachedConsumer().eval(), torch.randn(2, 3, 8, 8)
    state = _state(model)
    with pytest.raises(ValueError, match="pruned model no longer runs.*the model is unchanged"):
        ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert _unchanged(model, state) and model.c1.out_channels == 16
    with torch.no_grad():
        model(x)


def test_the_check_catches_a_wrong_output(monkeypatch):
    """A graph that lines a residual up wrongly (forced here: the space of `a` no longer joins
    the stem's) gives a model that runs but computes something else: the check raises."""
    from tensorslim.pruning import channel_graph

    monkeypatch.setattr(channel_graph.Spaces, "union", lambda self, a, b, where: a)
    model, x = KeywordAdd(False).eval(), torch.randn(2, 3, 8, 8)
    state = _state(model)
    with pytest.raises(ValueError, match="differs from the original without the removed channels"):
        ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert _unchanged(model, state)


class DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x, scale=None):
        y = self.fc2(F.relu(self.fc1(x)))
        return {"out": y if scale is None else y * scale}


def test_dict_batches_and_dict_outputs():
    torch.manual_seed(0)
    model, x = DictIn().eval(), torch.randn(4, 8)
    ref, _ = zeroed_reference(model, CFG, (x,))
    for importance in ("l1", "taylor"):
        m = copy.deepcopy(model)
        ts.prune(m, ts.ChannelPrune(ratio=0.5, round_to=1, importance=importance), calib_data=[{"x": x}],
                 progress=False)
        assert m.fc1.out_features == 16
    m = copy.deepcopy(model)
    ts.prune(m, CFG, calib_data=[{"x": x}], progress=False)
    with torch.no_grad():
        torch.testing.assert_close(m(x)["out"], ref(x)["out"], atol=1e-5, rtol=1e-5)


class CatKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(F.relu(torch.cat(tensors=[self.a(x), self.b(x)], dim=1)))


def test_concatenation_written_with_keywords():
    torch.manual_seed(0)
    model, x = CatKeyword().eval(), torch.randn(2, 3, 8, 8)
    ref, _ = zeroed_reference(model, CFG, (x,))
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model.head.in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the self-check's false refusals


class OutputTricks(nn.Module):
    """Correct to prune, but its outputs carry infinities, noise drawn in eval mode, an argmax, an
    operation after the output layer, and a counter buffer the forward moves."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 10)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")] * 5))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        h = F.relu(self.c1(x))
        logits = self.fc(F.relu(self.c2(h)).mean((2, 3))) + self.mask + 0.01 * torch.randn(x.shape[0], 10)
        return logits / 2.0, h, logits.argmax(1)  # `/ 2.0` after the output layer (a temperature)


def test_outputs_that_are_correct_but_not_plainly_comparable():
    torch.manual_seed(0)
    model, x = OutputTricks().eval(), torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    report = ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model.c1.out_channels == 16  # h is an output: its channels stay
    assert model.c2.out_channels == 4 and model.fc.in_features == 4 and model.fc.out_features == 10
    assert report.changed
    assert float(model.calls) == 0 and torch.equal(torch.get_rng_state(), rng)  # the prune's forwards left no trace


class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return torch.log_softmax(self.fc2(F.relu(self.fc1(x))) / 2.0, -1)


def test_operations_after_the_output_layer_keep_its_outputs():
    """An operation the graph does not know that only leads to the model output (a temperature,
    a log-softmax) keeps the output layer whole instead of failing the whole prune."""
    torch.manual_seed(0)
    model, x = Temperature().eval(), torch.randn(4, 8)
    ref, _ = zeroed_reference(model, CFG, (x,))
    report = ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model.fc1.out_features == 16 and model.fc2.out_features == 4
    assert "model output (through 'log_softmax'" in " ".join(c.reason for c in report.changes)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_schedule_finalize_once_and_undone_on_error(monkeypatch):
    from tensorslim.pruning import verify

    torch.manual_seed(0)
    model, x = KeywordAdd(False), torch.randn(2, 3, 8, 8)
    sched = ts.pruning.Schedule(model, CFG, start_step=0, end_step=2, frequency=1, example_inputs=x)
    for _ in range(3):
        sched.step()
    masked = {n: m.weight_mask.clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    state = _state(model)

    def refuse(*args):
        raise ValueError("refused for the test")

    monkeypatch.setattr(verify, "same_outputs", refuse)
    with pytest.raises(ValueError, match="refused for the test"):
        sched.finalize()
    # masks, their buffers and every weight as before (the masks were baked in and dropped)
    assert _unchanged(model, state)
    assert {n for n, m in model.named_modules() if hasattr(m, "weight_mask")} == set(masked)
    monkeypatch.undo()
    sched.finalize()
    assert model.stem.out_channels == 8 and not any(hasattr(m, "weight_mask") for m in model.modules())
    with pytest.raises(ValueError, match="already called"):  # it removed as many channels again
        sched.finalize()
    assert model.stem.out_channels == 8


class SqueezeExcite(nn.Module):
    """A conv block with squeeze-and-excitation (MobileNetV3 / EfficientNet): the scale's
    channels are the block's, joined by the product."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.se_down, self.se_up = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        h = F.relu(self.conv(F.relu(self.stem(x))))
        s = torch.sigmoid(self.se_up(F.relu(self.se_down(F.adaptive_avg_pool2d(h, 1)))))
        return self.head(h * s) * 0.5


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 64), nn.Linear(16, 64), nn.Linear(64, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(x - self.down(F.silu(self.gate(x)) * self.up(x)))


class FusedGLU(nn.Module):
    """A GLU in one linear: gate and up are the two halves of w12's outputs (`how`: chunk,
    chunk after data-dependent flow, which the autograd graph reads, or splits whose sizes the
    code writes as numbers, which cannot take fewer channels)."""

    def __init__(self, how="chunk"):
        super().__init__()
        self.how = how
        self.w12, self.down, self.head = nn.Linear(16, 128), nn.Linear(64, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.w12(x)
        if self.how == "chunk":
            gate, up = h.chunk(2, dim=-1)
        elif self.how == "sizes":
            gate, up = torch.split(h, [64, 64], -1)
        elif self.how == "size":
            gate, up = h.split(64, dim=-1)
        elif x.sum() > -1e9:  # fx cannot trace this
            if self.how == "autograd":
                gate, up = h.chunk(2, dim=2)
            else:
                gate, up = h.split(64, dim=2)
        return self.head(x - self.down(F.silu(gate) * up))


class ConvGLU(nn.Module):
    """A Conformer's convolution module: pointwise conv, GLU over the channels (nn.GLU, F.glu, or
    F.glu after data-dependent flow: the autograd graph), depthwise conv, BatchNorm, pointwise."""

    def __init__(self, how="module"):
        super().__init__()
        self.how = how
        self.pw1, self.glu = nn.Conv1d(16, 64, 1), nn.GLU(dim=1)
        self.dw, self.bn = nn.Conv1d(32, 32, 3, padding=1, groups=32), nn.BatchNorm1d(32)
        self.pw2, self.head = nn.Conv1d(32, 16, 1), nn.Conv1d(16, 3, 1)

    def forward(self, x):
        h = self.pw1(x)
        if self.how == "module":
            h = self.glu(h)
        elif self.how == "function":
            h = F.glu(h, dim=1)
        elif x.sum() > -1e9:
            h = F.glu(h, dim=1)
        return self.head(x + self.pw2(F.silu(self.bn(self.dw(h)))))


class LinearGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.o, self.head = nn.Linear(16, 64), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(x - self.o(F.glu(self.w(x), dim=-1)))


@pytest.mark.parametrize("make, layer, consumer", [
    (lambda: ConvGLU("module"), "pw1", "dw"), (lambda: ConvGLU("function"), "pw1", "dw"),
    (lambda: ConvGLU("autograd"), "pw1", "dw"), (LinearGLU, "w", "o")], ids=["module", "function", "autograd", "linear"])
def test_glu_halves_go_together(make, layer, consumer):
    """A GLU multiplies channel i of its input's first half by the sigmoid of channel i of the
    second: the layer before it loses rows i and 32 + i together, the layer after it input i."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 16, 10) if isinstance(model, ConvGLU) else torch.randn(2, 5, 16)
    ref, removed = zeroed_reference(model, CFG, (x,))
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    rows = removed[(layer, "weight", 0)]
    kept_half = sorted(i for i in rows if i < 32)
    assert len(rows) == 32 and sorted(rows) == kept_half + [32 + i for i in kept_half]
    after = getattr(model, consumer)  # a depthwise conv (its channels) or a linear (its inputs)
    assert getattr(model, layer).weight.shape[0] == 32
    assert (after.out_channels if isinstance(after, nn.Conv1d) else after.in_features) == 16
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class GroupNormBlock(nn.Module):
    """A diffusion U-Net's residual block, shortened: GroupNorm -> SiLU -> conv, twice, and the
    block's input added back (`dynamic`: data-dependent flow, so the autograd graph reads it;
    `clash`: the stem's output normalized by a second GroupNorm of another group size too)."""

    def __init__(self, groups=8, dynamic=False, clash=False):
        super().__init__()
        self.dynamic, self.clash = dynamic, clash
        self.stem, self.n1 = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(groups, 32)
        self.c1, self.n2 = nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(groups, 64)
        self.c2, self.head = nn.Conv2d(64, 32, 3, padding=1), nn.Conv2d(32, 4, 1)
        self.other = nn.GroupNorm(2, 32)
        with torch.no_grad():
            for n in (self.n1, self.n2, self.other):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.stem(x)
        if self.dynamic and x.sum() < -1e9:
            h = h * 2
        out = h + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(h))))))
        return self.head(out + self.other(h) if self.clash else out)


@pytest.mark.parametrize("groups, dynamic", [(8, False), (8, True), (32, False)])
def test_group_norm_loses_whole_groups(groups, dynamic, tmp_path):
    """A GroupNorm's statistics are per group, so its channels go in whole groups: the conv
    before it loses blocks of 64 / groups consecutive filters, the GroupNorm as many groups,
    and the residual stream (the stem, summed with c2's output, normalized by n1) likewise.
    32 groups: n1's of one channel each, n2's of two. Equal to the zeroed original."""
    torch.manual_seed(0)
    model, x = GroupNormBlock(groups, dynamic).eval(), torch.randn(2, 3, 8, 8)
    cfg = ts.ChannelPrune(ratio=0.5, round_to=1)
    ref, removed = zeroed_reference(model, cfg, (x,))
    ts.prune(model, cfg, example_inputs=(x,), progress=False)
    per = 64 // groups
    rows = removed[("c1", "weight", 0)]
    assert len(rows) == 32 and all(all(r + i in rows for i in range(per)) for r in rows if r % per == 0)
    assert len({r // per for r in rows}) == 32 // per  # whole groups only
    assert (model.c1.out_channels, model.n2.num_channels, model.n2.num_groups) == (32, 32, groups // 2)
    assert (model.stem.out_channels, model.n1.num_channels, model.n1.num_groups) == (16, 16, groups // 2)
    assert model.c2.out_channels == 16 and model.head.in_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    ts.save(model, tmp_path / "gn.safetensors")
    fresh = ts.load(GroupNormBlock(groups, dynamic).eval(), tmp_path / "gn.safetensors")
    assert fresh.n2.num_groups == groups // 2
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_group_norm_round_to_counts_channels():
    """round_to=8 with 16 groups of 4 (c1) and of 2 channels (the stem): the kept counts are
    multiples of 8 channels (2 and 4 groups), not of 8 groups (which would keep 32 and 16)."""
    torch.manual_seed(0)
    model, x = GroupNormBlock(16).eval(), torch.randn(2, 3, 8, 8)
    ts.prune(model, ts.ChannelPrune(ratio=0.75, round_to=8), example_inputs=(x,), progress=False)
    assert (model.c1.out_channels, model.n2.num_groups) == (16, 4)
    assert (model.stem.out_channels, model.n1.num_groups) == (8, 4)


class GatedGroupNorm(nn.Module):  # a conv gated by another, then normalized: both lose whole groups
    def __init__(self):
        super().__init__()
        self.value, self.gate = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(3, 32, 1)
        self.norm, self.head = nn.GroupNorm(8, 32), nn.Conv2d(32, 2, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(F.silu(self.norm(self.value(x) * torch.sigmoid(self.gate(x)))))


def test_group_norm_after_a_gate_groups_both_convs():
    torch.manual_seed(0)
    model, x = GatedGroupNorm().eval(), torch.randn(2, 3, 8, 8)
    cfg = ts.ChannelPrune(ratio=0.5, round_to=1)
    ref, removed = zeroed_reference(model, cfg, (x,))
    ts.prune(model, cfg, example_inputs=(x,), progress=False)
    assert (model.value.out_channels, model.gate.out_channels, model.norm.num_groups) == (16, 16, 4)
    assert removed[("value", "weight", 0)] == removed[("gate", "weight", 0)]
    assert len({r // 4 for r in removed[("value", "weight", 0)]}) == 4  # whole groups of 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class OneGroup(nn.Module):  # PoolFormer normalizes with GroupNorm(1, C): statistics over every channel
    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(1, 16)
        self.fc1, self.fc2, self.head = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.fc2(F.gelu(self.fc1(self.norm(h)))))


def test_group_norm_with_one_group_keeps_its_channels():
    torch.manual_seed(0)
    model, x = OneGroup().eval(), torch.randn(2, 3, 8, 8)
    cfg = ts.ChannelPrune(ratio=0.5, round_to=1)
    ref, _ = zeroed_reference(model, cfg, (x,))
    report = ts.prune(model, cfg, example_inputs=(x,), progress=False)
    assert model.stem.out_channels == 16 and model.norm.num_groups == 1 and model.fc1.out_channels == 16
    assert any("GroupNorm 'norm' would lose channels out of whole groups of 16" in c.reason for c in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_group_norms_of_two_sizes_on_one_stream_keep_it():
    torch.manual_seed(0)
    model, x = GroupNormBlock(8, clash=True).eval(), torch.randn(2, 3, 8, 8)
    cfg = ts.ChannelPrune(ratio=0.5, round_to=1)
    ref, _ = zeroed_reference(model, cfg, (x,))
    ts.prune(model, cfg, example_inputs=(x,), progress=False)
    assert model.stem.out_channels == 32 and model.n1.num_groups == 8 and model.other.num_groups == 2
    assert model.c1.out_channels == 32  # inside the block, one group size: pruned
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class SplitAcrossLayers(nn.Module):
    """A split whose parts cut across the two layers concatenated before it: kept whole."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(24, 8)

    def forward(self, x):
        first, second = torch.cat([self.a(x), self.b(x)], -1).split([8, 24], -1)
        return self.d(second) + self.c(x) * first


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)
        self.gamma = nn.Parameter(torch.rand(32))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) * self.gamma)


@pytest.mark.parametrize("make, x, sizes", [
    (SqueezeExcite, torch.randn(2, 3, 8, 8), {"stem": 8, "conv": 16, "se_down": 4, "se_up": 16}),
    (SwiGLU, torch.randn(2, 5, 16), {"gate": 32, "up": 32}),
    (lambda: FusedGLU("chunk"), torch.randn(2, 5, 16), {"w12": 64}),  # a gate and its up go together
    (lambda: FusedGLU("autograd"), torch.randn(2, 5, 16), {"w12": 64}),
    (LayerScale, torch.randn(4, 8), {"fc1": 32}),  # x * gamma: a tensor the graph does not follow
])
def test_products_join_channels(make, x, sizes):
    torch.manual_seed(0)
    model = make().eval()
    ref, removed = zeroed_reference(model, CFG, (x,))
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    mods = dict(model.named_modules())
    assert {n: mods[n].weight.shape[0] for n in sizes} == sizes
    if "w12" in sizes:  # gate row i and up row 64 + i leave together, with down's column i
        rows, cols = removed[("w12", "weight", 0)], removed[("down", "weight", 1)]
        assert sorted(rows) == sorted(cols + [64 + c for c in cols]) and model.down.in_features == 32
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["sizes", "size", "autograd size"])
def test_a_split_of_sizes_written_in_the_code_keeps_its_channels(how):
    """`split([64, 64])` / `split(64)` cannot take fewer channels: the check fails with the
    split followed (the pruned model no longer runs), and the model is read again without it."""
    torch.manual_seed(0)
    model, x = FusedGLU(how).eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="nothing was compressed"):
        ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model.w12.out_features == 128 and model.down.in_features == 64
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_a_split_across_segments_keeps_their_channels():
    torch.manual_seed(0)
    model, x = SplitAcrossLayers().eval(), torch.randn(2, 5, 8)
    with torch.no_grad():
        want = model(x)
    report = ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert (model.a.out_features, model.b.out_features) == (16, 16)
    assert any("is not understood by the channel graph" in c.reason for c in report.skipped if c.name in ("a", "b"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


class TinyUNet(nn.Module):
    """Encoder, a transposed-conv or interpolating decoder, and a skip concatenation."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.transposed = transposed
        self.enc, self.mid = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2) if transposed else nn.Conv2d(32, 16, 1)
        self.dec, self.head = nn.Conv2d(32, 16, 3, padding=1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        m = F.relu(self.mid(F.max_pool2d(e, 2)))
        u = self.up(m) if self.transposed else F.interpolate(self.up(m), scale_factor=2.0, mode="nearest")
        return self.head(F.relu(self.dec(torch.cat([e, F.relu(u)], 1))))


@pytest.mark.parametrize("transposed", [True, False])
def test_unet_decoders(transposed, tmp_path):
    from tensorslim.pruning import verify

    torch.manual_seed(0)
    model, x = TinyUNet(transposed).eval(), torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model)
    report = ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert (model.enc.out_channels, model.mid.out_channels, model.up.out_channels, model.dec.in_channels) == (8, 16, 8, 16)
    # the original with every removed row, column and statistic zeroed (the check's reference)
    removed, _, _ = C.plan(original, C.build_spaces(original, CFG, None, (x,)), CFG, None)
    want = verify.without_channels(original, x, removed)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    assert {"enc", "mid", "up", "dec"} <= {c.name for c in report.changed}
    ts.save(model, tmp_path / "unet.safetensors")
    fresh = TinyUNet(transposed)
    ts.load(fresh, tmp_path / "unet.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


class ConvNeXtBlock(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 4, stride=4)
        self.dw, self.ln = nn.Conv2d(d, d, 7, padding=3, groups=d), nn.LayerNorm(d)
        self.pw1, self.pw2, self.head = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.pw2(F.gelu(self.pw1(self.ln(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


class PatchTokens(nn.Module):  # a ViT's patch embedding, then an MLP on the tokens
    def __init__(self):
        super().__init__()
        self.patch, self.fc1, self.fc2 = nn.Conv2d(3, 32, 4, stride=4), nn.Linear(32, 64), nn.Linear(64, 5)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.patch(x).flatten(2).transpose(1, 2)))).mean(1)


@pytest.mark.parametrize("make, sizes, kept", [
    (ConvNeXtBlock, {"pw1": 32, "stem": 16}, "module 'ln' (LayerNorm)"),  # the residual stream keeps its width
    (PatchTokens, {"patch": 16, "fc1": 32}, None),
])
def test_channels_follow_permute_and_transpose(make, sizes, kept):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(2, 3, 16, 16)
    ref, _ = zeroed_reference(model, CFG, (x,))
    report = ts.prune(model, CFG, example_inputs=(x,), progress=False)
    mods = dict(model.named_modules())
    assert {n: mods[n].weight.shape[0] for n in sizes} == sizes
    if kept:
        assert any(f"cannot be pruned consistently: {kept}" in c.reason for c in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class Heads(nn.Module):
    """What real CNN heads and blocks write: h_swish (x * relu6(x + 3) / 6), a classifier after
    x.view(x.size(0), -1), a CRNN's flatten(1, 2) of channels x height into a sequence."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 if kind == "crnn" else 16 * 16, 5)

    def forward(self, x):
        h = self.a(x)
        h = self.b(h * F.relu6(h + 3) / 6)
        if self.kind == "crnn":  # [N, C, H=4, W=4] -> [N, W, C * H]
            return self.fc(h.flatten(1, 2).permute(0, 2, 1))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("kind", ["view", "crnn"])
def test_common_heads(kind):
    torch.manual_seed(0)
    model, x = Heads(kind).eval(), torch.randn(2, 3, 4, 4)
    ref, _ = zeroed_reference(model, CFG, (x,))
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model.a.out_channels == 8 and model.b.out_channels == 8  # before: the divide, the view kept them
    assert model.fc.in_features == (8 * 4 if kind == "crnn" else 8 * 16)  # flatten(1, 2) ignored end_dim
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class Odd(nn.Module):
    """A dimension computed from the tensor, a conv over a linear's (N, L, C) output, and a head
    that runs only in training mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.lin, self.conv1d = nn.Linear(8, 16), nn.Conv1d(16, 4, 1)
        self.aux = nn.Linear(16, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        y = self.b(h).mean(dim=(h.ndim - 2, h.ndim - 1))[:, None, :]  # [N, 1, 8]
        out = self.conv1d(self.lin(y).transpose(1, 2))  # lin's 16 features are the conv's channels
        if self.training:
            return out, self.aux(h.mean((2, 3)))
        return out


def test_odd_patterns_keep_channels_and_untraced_layers_warn():
    torch.manual_seed(0)
    model, x = Odd().eval(), torch.randn(2, 3, 8, 8)
    state = _state(model)
    with pytest.warns(UserWarning, match=r"layers 'aux' did not run on the example batch"):
        report = ts.prune(model, CFG, example_inputs=(x,), progress=False)
    reasons = " ".join(c.reason for c in report.changes)
    assert "takes a dimension or size computed at run time" in reasons  # was a bare TypeError
    assert model.a.out_channels == 8 and model.b.out_channels == 8  # a pruned, b kept (its mean)
    assert model.lin.out_features == 8 and model.conv1d.in_channels == 8  # transposed into the conv
    assert state["aux.weight"].shape == model.aux.weight.shape  # never traced: its input stays 16 wide


class MyConv(nn.Conv2d):  # a subclass that keeps nn.Conv2d's forward (a custom init)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.kaiming_normal_(self.weight)


def test_layer_subclasses_are_their_layer():
    """fx traced into them (F.conv2d, which the graph does not know): nothing was pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(MyConv(3, 16, 3, padding=1), nn.ReLU(), MyConv(16, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    ref, _ = zeroed_reference(model, CFG, (x,))
    ts.prune(model, CFG, example_inputs=(x,), progress=False)
    assert model[0].out_channels == 8 and model[2].in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


class _TokenNet(nn.Module):
    """Token ids in (no float input to differentiate), forward(**kwargs) as Hugging Face models
    have, a branch fx cannot trace: the autograd graph is driven by the parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.fc1, self.fc2, self.out = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, input_ids, scale=None, **kwargs):
        h = self.emb(input_ids).mean(1)
        if h.sum() > -1e9:  # data-dependent: not traceable by fx
            h = h * 1.0
        return self.out(self.fc2(torch.relu(self.fc1(h))))


def test_dict_example_for_a_forward_with_kwargs_and_token_ids():
    model = _TokenNet().eval()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    ref = model(ids)
    ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs={"input_ids": ids}, progress=False)
    assert model.fc1.out_features == 16  # pruned through the autograd graph
    assert model(ids).shape == ref.shape
    with pytest.raises(ValueError, match=r"keys \['labels'\] are not named parameters of _TokenNet.forward"):
        ts.prune(_TokenNet().eval(), ts.ChannelPrune(ratio=0.5), example_inputs={"input_ids": ids, "labels": ids},
                 progress=False)


class _WidthInCode(nn.Module):
    """`h.reshape(-1, 32)` names the width as a number: it stays 32 however many channels
    remain, so the channels before it are kept (those after it prune)."""

    def __init__(self, branchy=False):
        super().__init__()
        torch.manual_seed(0)
        self.branchy = branchy
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 64), nn.Linear(64, 3)

    def forward(self, x):  # [B, T, 8]
        h = torch.relu(self.fc1(x))
        if self.branchy and h.sum() > -1e9:  # fx cannot trace this: the autograd graph is read
            h = h * 1.0
        return self.fc3(torch.relu(self.fc2(h.reshape(-1, 32))))


class _HeadsFromWidth(nn.Module):
    """Heads split by hand, their size read from the residual stream's width (`c // 4`): read as
    keeping channels, the token folds let the residual stream prune and the split fail the
    check; the autograd route is retried without them (then nothing prunes, nothing raises)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.q, self.o, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        if h.sum() > -1e9:  # fx cannot trace this: the autograd graph is read
            h = h * 1.0
        b, t, c = h.shape
        a = torch.softmax(self.q(h).view(b, t, 4, c // 4), -1).reshape(b, t, c)
        return self.head((h + self.o(a)).mean(1))


@pytest.mark.parametrize("branchy", [False, True], ids=["fx", "autograd"])
def test_a_width_written_in_the_code_keeps_its_channels(branchy):
    model = _WidthInCode(branchy).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=(x,), progress=False)
    assert model.fc1.out_features == 32 and model.fc2.out_features == 32


def test_a_width_read_for_a_head_split_is_retried_without_token_folds():
    model = _HeadsFromWidth().eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    with pytest.warns(UserWarning, match="nothing was compressed"):
        ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=(x,), progress=False)
    assert model.inp.out_features == 32 and torch.equal(model(x), ref)
