"""ChannelPrune on torch's own transformer layers: nn.MultiheadAttention heads (unpacked into a
ProjectedMultiheadAttention holding fewer heads) and nn.TransformerEncoderLayer / DecoderLayer
FFN neurons. The reference is computed here from the weights alone: the heads and neurons with
the smallest sums of squares (l2 importance) are the ones a pruning must remove, and the
original model with those units' output-projection columns zeroed must give what the pruned
model gives."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.nn.projected_attention import ProjectedMultiheadAttention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lowest(scores: torch.Tensor, drop: int) -> list:
    return sorted(torch.argsort(scores, stable=True)[:drop].tolist())


def _head_scores(mha: nn.MultiheadAttention) -> torch.Tensor:
    """l2 importance per head: squares of its q / k / v rows, biases, bias_k / bias_v and
    out_proj columns, summed in float64."""
    hd, n = mha.head_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        ws = list(mha.in_proj_weight.detach().double().chunk(3))
    else:
        ws = [w.detach().double() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
    rows = [w.reshape(n, hd, -1).pow(2).sum((1, 2)) for w in ws]
    if mha.in_proj_bias is not None:
        rows += [b.reshape(n, hd).pow(2).sum(1) for b in mha.in_proj_bias.detach().double().chunk(3)]
    for extra in (mha.bias_k, mha.bias_v):
        if extra is not None:
            rows.append(extra.detach().double().reshape(n, hd).pow(2).sum(1))
    out_cols = mha.out_proj.weight.detach().double().reshape(-1, n, hd).pow(2).sum((0, 2))
    return sum(rows) + out_cols


def _neuron_scores(lin1: nn.Linear, lin2: nn.Linear) -> torch.Tensor:
    s = lin1.weight.detach().double().pow(2).sum(1) + lin2.weight.detach().double().pow(2).sum(0)
    return s + (lin1.bias.detach().double().pow(2) if lin1.bias is not None else 0)


def _zeroed(model: nn.Module, head_ratio: float, ratio: float) -> nn.Module:
    """The original with the lowest-scoring heads' out_proj columns and neurons' linear2 columns zeroed."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.MultiheadAttention):
                drop = m.num_heads - round(m.num_heads * (1 - head_ratio))
                for h in _lowest(_head_scores(m), drop):
                    m.out_proj.weight[:, h * m.head_dim:(h + 1) * m.head_dim] = 0
            if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and ratio:
                n = m.linear1.out_features
                m.linear2.weight[:, _lowest(_neuron_scores(m.linear1, m.linear2), n - round(n * (1 - ratio)))] = 0
    return ref


def _encoder(seed=0, **kw):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(64, 8, 128, dropout=0.0, batch_first=True, **kw)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(64, 10)).eval()


X = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(1))


def test_encoder_heads_and_neurons(tmp_path):
    model = _encoder()
    ref = _zeroed(model, 0.25, 0.25)
    report = ts.prune(model, ts.ChannelPrune(ratio=0.25, head_ratio=0.25, importance="l2"),
                      example_inputs=(X,), progress=False)
    for layer in model[0].layers:
        att = layer.self_attn
        assert isinstance(att, ProjectedMultiheadAttention)
        assert (att.num_heads, att.head_dim, att.embed_dim) == (6, 8, 64)
        assert [getattr(att, p).weight.shape[0] for p in ("q_proj", "k_proj", "v_proj")] == [48] * 3
        assert att.out_proj.weight.shape == (64, 48) and layer.linear1.out_features == 96
    assert {c.name for c in report.changed} >= {"0.layers.1.self_attn.q_proj", "0.layers.1.linear2"}
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[0, 8:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(12)
    for kwargs in ({}, {"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True}):
        want = ref[1](ref[0](X, **kwargs))
        got = model[1](model[0](X, **kwargs))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        with torch.inference_mode():  # torch's fused path would need packed weights: declined
            torch.testing.assert_close(model[1](model[0](X, **kwargs)), want.detach(), atol=2e-5, rtol=1e-5)
    path = tmp_path / "pruned.safetensors"
    ts.save(model, path)
    fresh = _encoder(seed=5)
    ts.load(fresh, path)
    assert fresh[0].layers[0].self_attn.num_heads == 6
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_pruned_then_quantized_saves_and_loads(tmp_path):
    model = _encoder()
    ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5), example_inputs=(X,), progress=False)
    with torch.no_grad():
        pruned = model(X)
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    att = model[0].layers[0].self_attn
    assert att.num_heads == 4 and type(att.q_proj).__name__ != "Linear"
    with torch.no_grad():
        got = model(X)
    assert (got - pruned).norm() / pruned.norm() < 0.05  # INT8 error, not a broken attention
    path = tmp_path / "pq.safetensors"
    ts.save(model, path)
    fresh = _encoder(seed=7)
    ts.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(X), got)


def test_decoder_self_and_cross_attention():
    torch.manual_seed(0)
    model = nn.Transformer(64, 4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=96, dropout=0.0,
                           batch_first=True).eval()
    src, tgt = X[:, :10], X[:, :7] * 0.5
    ref = _zeroed(model, 0.5, 0.5)
    ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5, importance="l2"), example_inputs=(src, tgt),
             progress=False)
    dec = model.decoder.layers[0]
    assert dec.self_attn.num_heads == 2 and dec.multihead_attn.num_heads == 2 and dec.linear1.out_features == 48
    torch.testing.assert_close(model(src, tgt), ref(src, tgt), atol=2e-5, rtol=1e-5)


class _Block(nn.Module):
    """A hand-written pre-norm block (no torch transformer layer): heads through the attention
    rule, MLP neurons through the traced graph."""

    def __init__(self, width=48, heads=6, **mha):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, **mha)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _Net(nn.Module):
    def __init__(self, **mha):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 48)
        self.blocks = nn.Sequential(_Block(**mha), _Block(**mha))
        self.head = nn.Linear(48, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


@pytest.mark.parametrize("mha", [{}, {"add_bias_kv": True}, {"add_zero_attn": True, "bias": False}],
                         ids=["plain", "bias_kv", "zero_attn_no_bias"])
def test_hand_written_block_heads_and_mlp(mha, recwarn):
    model = _Net(**mha).eval()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    ref = _zeroed(model, 1 / 3, 0.0)
    # no pruned neurons in the reference: ratio=0 for the MLP here, heads only
    ts.prune(model, ts.ChannelPrune(ratio=0.0, head_ratio=1 / 3, importance="l2"), example_inputs=(x,),
             progress=False)
    att = model.blocks[0].attn
    assert att.num_heads == 4 and att.q_proj.out_features == 32
    if mha.get("add_bias_kv"):
        assert att.bias_k.shape == (1, 1, 32)
    torch.testing.assert_close(model(x), ref(x), atol=2e-5, rtol=1e-5)
    assert not [w for w in recwarn if "did not run" in str(w.message)]


class _CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(48, 6, kdim=20, vdim=24, add_bias_kv=True)  # sequence-first
        self.out = nn.Linear(48, 3)

    def forward(self, q, k, v):
        return self.out(self.attn(q, k, v)[0])


def test_kdim_vdim_sequence_first_attention():
    model = _CrossAttention().eval()
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(5, 2, 48, generator=g), torch.randn(7, 2, 20, generator=g), torch.randn(7, 2, 24, generator=g)
    ref = _zeroed(model, 0.5, 0.0)
    ts.prune(model, ts.ChannelPrune(ratio=0.0, head_ratio=0.5, importance="l2"), example_inputs=(q, k, v),
             progress=False)
    att = model.attn
    assert (att.num_heads, att.k_proj.weight.shape, att.v_proj.weight.shape) == (3, (24, 20), (24, 24))
    torch.testing.assert_close(model(q, k, v), ref(q, k, v), atol=2e-5, rtol=1e-5)


def test_hand_written_block_mlp_neurons_through_the_graph():
    model = _Net().eval()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5), example_inputs=(x,), progress=False)
    assert model.blocks[1].mlp[0].out_features == 96 and model.blocks[1].attn.num_heads == 3
    assert model.embed.out_features == 48  # the residual stream reads into the attention whole
    skipped = {c.name: c.reason for c in report.changes if c.action == "skipped"}
    assert "'blocks.0.attn' (ProjectedMultiheadAttention)" in skipped["embed"]


class _BranchyNet(_Net):
    """Data-dependent control flow: torch.fx cannot trace it, the autograd graph is read instead
    (where the attention's projections show up as linears of their own)."""

    def forward(self, x):
        h = self.blocks(self.embed(x))
        if h.sum() > -1e9:
            h = h * 1.0
        return self.head(h.mean(1))


def test_autograd_graph_keeps_projections_to_the_head_rule():
    model = _BranchyNet().eval()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    ref = _zeroed(model, 0.5, 0.0)
    report = ts.prune(model, ts.ChannelPrune(ratio=0.0, head_ratio=0.5, importance="l2"), example_inputs=(x,),
                      progress=False)
    assert model.blocks[0].attn.num_heads == 3 and model.blocks[1].attn.num_heads == 3
    assert not [c.name for c in report.changes if c.action == "skipped" and ".attn." in c.name]
    torch.testing.assert_close(model(x), ref(x), atol=2e-5, rtol=1e-5)


def test_head_ratio_zero_keeps_torchs_attention():
    model = _encoder()
    keys = set(model.state_dict())
    ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0), example_inputs=(X,), progress=False)
    assert type(model[0].layers[0].self_attn) is nn.MultiheadAttention
    assert model[0].layers[0].linear1.out_features == 64
    assert set(model.state_dict()) == keys


def test_excluded_attention_goes_back_packed_with_one_row():
    model = _encoder()
    before = model[0].layers[0].self_attn
    weight = before.in_proj_weight.detach().clone()
    report = ts.prune(model, ts.ChannelPrune(ratio=0.25, exclude=["0.layers.0.self_attn.*"]),
                      example_inputs=(X,), progress=False)
    assert model[0].layers[0].self_attn is before and torch.equal(before.in_proj_weight, weight)
    assert isinstance(model[0].layers[1].self_attn, ProjectedMultiheadAttention)
    rows = [c for c in report.changes if c.name.startswith("0.layers.0.self_attn")]
    assert [(c.name, c.module_type, c.action) for c in rows] == [("0.layers.0.self_attn", "MultiheadAttention",
                                                                  "skipped")]
    assert "excluded by pattern" in rows[0].reason
    assert model[0].use_nested_tensor is False  # an unpacked attention remains in the encoder


def test_attention_with_hooks_keeps_its_heads():
    model = _encoder()
    att = model[0].layers[0].self_attn
    att.register_forward_hook(lambda m, i, o: None)
    report = ts.prune(model, ts.ChannelPrune(ratio=0.25), example_inputs=(X,), progress=False)
    assert model[0].layers[0].self_attn is att
    row = next(c for c in report.changes if c.name == "0.layers.0.self_attn")
    assert row.action == "skipped" and "forward hooks" in row.reason


def test_error_leaves_every_attention_packed():
    model = _encoder()
    atts = [layer.self_attn for layer in model[0].layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="leaves 0 of its 8 heads"):
        ts.prune(model, ts.ChannelPrune(ratio=0.25, head_ratio=0.95), example_inputs=(X,), progress=False)
    assert [layer.self_attn for layer in model[0].layers] == atts
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_schedule_needs_unpacked_attention_for_heads():
    model = _encoder()
    sched = ts.pruning.Schedule(model, ts.ChannelPrune(ratio=0.5), 0, 2, 1, example_inputs=(X,))
    report = sched.step()
    row = next(c for c in report.changes if c.name == "0.layers.0.self_attn")
    assert "ts.unpack_attention" in row.reason
    model = _encoder()
    ts.unpack_attention(model)
    sched = ts.pruning.Schedule(model, ts.ChannelPrune(ratio=0.5), 0, 2, 1, example_inputs=(X,))
    for _ in range(2):
        sched.step()
    sched.finalize()
    assert model[0].layers[0].self_attn.num_heads == 4


def test_per_head_masks_follow_the_pruned_head_count():
    model = _encoder()
    ts.prune(model, ts.ChannelPrune(ratio=0.0, head_ratio=0.5), example_inputs=(X,), progress=False)
    att = model[0].layers[0].self_attn
    mask = torch.zeros(3 * 4, 12, 12)
    out, _ = att(X, X, X, attn_mask=mask)
    assert out.shape == X.shape
    with pytest.raises(ValueError, match=r"\[12, 12, 12\] \(batch \* heads"):
        att(X, X, X, attn_mask=torch.zeros(3 * 8, 12, 12))


class _DigitsTransformer(nn.Module):
    """scikit-learn's 8x8 digits as 8 tokens (image rows) through torch's TransformerEncoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 32)
        self.pos = nn.Parameter(torch.randn(8, 32) * 0.1)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.reshape(-1, 8, 8)) + self.pos).mean(1))


def test_digits_accuracy_after_pruning_half_the_heads_and_neurons():
    pytest.importorskip("sklearn")
    from tensorslim.eval.digits_basic_resnet import accuracy, digits_images, train

    xtr, ytr, xte, yte = digits_images()
    model = train(_DigitsTransformer(), xtr, ytr, epochs=30)
    dense = accuracy(model, xte, yte)
    ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5, importance="l2"), example_inputs=(xtr[:8],),
             progress=False)
    assert model.encoder.layers[0].self_attn.num_heads == 2 and model.encoder.layers[0].linear1.out_features == 32
    pruned = accuracy(model, xte, yte)
    tuned = accuracy(train(model, xtr, ytr, epochs=10, lr=1e-3), xte, yte)  # a new optimizer on the smaller model
    print(f"\ndigits transformer accuracy: dense {dense:.3f}, half the heads and neurons removed {pruned:.3f}, "
          f"after 10 epochs {tuned:.3f}")
    assert dense > 0.93 and tuned > dense - 0.03


def test_layers_outside_torchs_blocks_are_pruned_through_the_graph():
    """A stem and a head around nn.TransformerEncoder: the graph prunes them (the encoder reads
    and writes its width whole), the layer rules prune the encoder's heads and neurons."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32),
                          nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                                                1, enable_nested_tensor=False),
                          nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=(x,), progress=False)
    assert model[0].out_features == 32 and model[4].out_features == 32  # stem and head hidden widths
    assert model[2].out_features == 32 and model[3].layers[0].linear1.out_features == 32
    assert model[3].layers[0].self_attn.num_heads == 2
    notes = {c.name: c.reason for c in report.changes}
    assert "coupled with the input of '3' (TransformerEncoder)" in notes["2"]  # its width stays


class _TwoCalls(nn.Module):
    """One attention under two names, a single-head attention, one whose weights are returned."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.MultiheadAttention(32, 4, batch_first=True)
        self.again = self.shared
        self.single = nn.MultiheadAttention(32, 1, batch_first=True)
        self.weighted = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        x = x + self.shared(x, x, x)[0]
        x = x + self.again(x, x, x)[0]
        x = x + self.single(x, x, x)[0]
        y, w = self.weighted(x, x, x)
        return self.out(x + y), w


def test_attentions_whose_heads_cannot_go_are_kept_with_a_row():
    model = _TwoCalls().eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(5))
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.warns(UserWarning, match="nothing was compressed"):
        report = ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=(x,), progress=False)
    rows = {c.name: c.reason for c in report.changes if c.action == "skipped"}
    assert "held under 2 names" in rows["shared"]
    assert "a single head" in rows["single"]
    assert "its attention weights are used" in rows["weighted"]
    for name in ("shared", "single", "weighted"):  # packed again, every weight as it was
        assert type(getattr(model, name)) is nn.MultiheadAttention
    assert model.again is model.shared
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


class _MaskedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = _encoder()[0]

    def forward(self, x, mask):
        return self.enc(x, mask=mask)


def test_a_per_head_mask_keeps_the_heads():
    model = _MaskedEncoder().eval()
    mask = torch.zeros(3 * 8, 12, 12)
    mask[:, :, -2:] = float("-inf")
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=(X, mask), progress=False)
    assert type(model.enc.layers[0].self_attn) is nn.MultiheadAttention
    assert model.enc.layers[0].linear1.out_features == 64
    row = next(c for c in report.changes if c.name == "enc.layers.0.self_attn")
    assert "3-D (per-head) attn_mask" in row.reason


def test_exclude_names_the_attention_itself():
    model = _encoder()
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, exclude=["0.layers.1.self_attn"]), example_inputs=(X,),
                      progress=False)
    assert type(model[0].layers[1].self_attn) is nn.MultiheadAttention
    assert model[0].layers[0].self_attn.num_heads == 4
    rows = [c for c in report.changes if c.name.startswith("0.layers.1.self_attn")]
    assert len(rows) == 1 and "excluded by pattern '0.layers.1.self_attn'" in rows[0].reason


def test_schedule_finalize_on_packed_attentions_says_why():
    model = _encoder()
    sched = ts.pruning.Schedule(model, ts.ChannelPrune(ratio=0.5), 0, 2, 1, example_inputs=(X,))
    for _ in range(2):
        sched.step()
    report = sched.finalize()
    assert model[0].layers[0].linear1.out_features == 64
    row = next(c for c in report.changes if c.name == "0.layers.0.self_attn")
    assert "ts.unpack_attention" in row.reason


def test_head_pruned_quantized_file_loads_into_an_unpacked_model(tmp_path):
    model = _encoder()
    ts.prune(model, ts.ChannelPrune(ratio=0.25), example_inputs=(X,), progress=False)
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    ts.save(model, tmp_path / "m.safetensors")
    fresh = _encoder(seed=3)
    ts.unpack_attention(fresh)
    ts.load(fresh, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


class _ReadsPackedWeights(nn.Module):
    """Model code handing an attention's packed parameters to F.multi_head_attention_forward
    itself: unpacked, it fails; ChannelPrune prunes again with the attention packed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.inp2 = nn.Linear(8, 64), nn.Linear(64, 32)
        self.attn, self.head = nn.MultiheadAttention(32, 4), nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp2(torch.relu(self.inp(x))).transpose(0, 1)
        a = self.attn
        o, _ = F.multi_head_attention_forward(h, h, h, a.embed_dim, a.num_heads, a.in_proj_weight, a.in_proj_bias,
                                              None, None, False, 0.0, a.out_proj.weight, a.out_proj.bias,
                                              training=False, need_weights=False)
        return self.head(o.mean(0))


def test_model_reading_packed_weights_prunes_with_the_attention_packed():
    model = _ReadsPackedWeights().eval()
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=(x,), progress=False)
    assert type(model.attn) is nn.MultiheadAttention and model.inp.out_features == 32
    row = next(c for c in report.changes if c.name == "attn")
    assert "did not prune with it unpacked" in row.reason


class _GluLayer(nn.TransformerEncoderLayer):
    """A feed-forward of its own (a GLU over a doubled linear1): the FFN rule leaves it alone."""

    def __init__(self):
        super().__init__(32, 4, 64, dropout=0.0, batch_first=True)
        self.linear1 = nn.Linear(32, 128)

    def _ff_block(self, x):
        a, b = self.linear1(x).chunk(2, dim=-1)
        return self.linear2(a * torch.sigmoid(b))


def test_a_layer_with_its_own_feed_forward_keeps_its_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(_GluLayer(), nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=(x,), progress=False)
    assert model[0].linear1.out_features == 128 and model[0].self_attn.num_heads == 2
