"""ts.prune on GPT-2's Conv1D layers (y = x @ W + b, W stored [in, out]: an output channel is a
COLUMN of W).

Unstructured: each Conv1D stays a Conv1D with a mask on its own weight; references are exact
zero counts, thresholds computed here from |W|, and the nn.Linear twin's masks (transposed).
Structured: FFN neurons are c_fc columns -> mlp.c_proj rows, a head is head_dim columns of each
q / k / v third of c_attn -> attn.c_proj rows; the removed units are computed here from
per-column / per-row L1 norms, the kept weights are checked slice by slice, and the output
against the original model with the removed units' c_proj rows zeroed."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import tensorslim as ts  # noqa: E402
from tensorslim.pruning import masks  # noqa: E402
from tiny_gpt2 import (BLOCKS, CONV1D_NAMES, IDS, assert_state_unchanged, linear_twin, logits,  # noqa: E402
                       state_copy, tiny_gpt2)

HEADS, HEAD_DIM, EMBED, INNER = 4, 16, 64, 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv_masks(model):
    return {n: model.get_submodule(n).weight_mask.clone() for n in CONV1D_NAMES}


# ---------------------------------------------------------------- unstructured masks

@pytest.mark.parametrize("cfg", [ts.Magnitude(sparsity=0.6), ts.Magnitude(sparsity=0.6, norm=2),
                                 ts.RandomPrune(sparsity=0.6, seed=3)], ids=["l1", "l2", "random"])
def test_layer_scope_masks_conv1d_like_its_linear_twin(cfg):
    model = tiny_gpt2()
    dense = copy.deepcopy(model)
    twin = linear_twin(model)
    report = ts.prune(model, cfg, progress=False)
    ts.prune(twin, cfg, progress=False)
    rows = {c.name: c for c in report.changes if c.module_type == "Conv1D"}
    assert set(rows) == CONV1D_NAMES and all(r.action == "pruned" for r in rows.values()), report
    for name in CONV1D_NAMES:
        mod, w = model.get_submodule(name), dense.get_submodule(name).weight.detach()
        assert type(mod) is Conv1D and mod.weight.shape == w.shape
        keep = mod.weight_mask
        assert int((~keep).sum()) == round(0.6 * w.numel())
        assert torch.equal(mod.weight.detach(), w * keep)  # kept weights untouched
        assert torch.equal(keep, twin.get_submodule(name).weight_mask.t()), name  # same as the Linear, transposed
        if isinstance(cfg, ts.Magnitude):  # random weights: no ties, so |w| > the k-th smallest
            t = torch.kthvalue(w.abs().flatten(), round(0.6 * w.numel())).values
            assert torch.equal(keep, w.abs() > t), name
    torch.testing.assert_close(logits(model), logits(twin), rtol=1e-5, atol=1e-5)


def test_global_scope_one_threshold_over_linear_and_conv1d():
    model = tiny_gpt2()
    cfg = ts.Magnitude(sparsity=0.7, scope="global", skip_output_head=False)
    report = ts.prune(model, cfg, progress=False)
    names = CONV1D_NAMES | {"lm_head"}
    assert {c.name for c in report.changed} == names
    # lm_head is tied to the token embedding: weights and mask shared, counted once here
    mods = [model.get_submodule(n) for n in sorted(names)]
    total = sum(m.weight.numel() for m in mods)
    pruned = sum(int((~m.weight_mask).sum()) for m in mods)
    assert pruned == round(0.7 * total)
    kept_min = min(float(m.weight.detach().abs()[m.weight_mask].min()) for m in mods)
    dense = tiny_gpt2()
    gone_max = max(float(dense.get_submodule(n).weight.detach().abs()[~model.get_submodule(n).weight_mask].max())
                   for n in sorted(names))
    assert gone_max <= kept_min
    # the per-layer counts differ (one threshold, not one fraction per layer)
    fracs = {n: masks.sparsity(model.get_submodule(n)) for n in CONV1D_NAMES}
    assert max(fracs.values()) - min(fracs.values()) > 0.05


def test_summary_and_finalize_keep_conv1d():
    model = tiny_gpt2()
    ts.prune(model, ts.Magnitude(sparsity=0.5), progress=False)
    rows = {c.name: c for c in ts.summary(model).changes if c.action == "pruned"}
    assert set(rows) == CONV1D_NAMES and all(r.module_type == "Conv1D" for r in rows.values())
    assert all(r.format == "50.0% sparse" for r in rows.values())
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in CONV1D_NAMES}
    ts.pruning.finalize(model)
    for name, w in weights.items():
        mod = model.get_submodule(name)
        assert type(mod) is Conv1D and not masks.is_masked(mod) and "weight_mask" not in mod.state_dict()
        assert torch.equal(mod.weight.detach(), w)


def test_masked_conv1d_save_load(tmp_path):
    model = tiny_gpt2()
    ts.prune(model, ts.RandomPrune(sparsity=0.4, seed=1), progress=False)
    path = tmp_path / "masked.slim.safetensors"
    ts.save(model, path)
    fresh = tiny_gpt2(seed=5)
    ts.load(fresh, path)
    for name in CONV1D_NAMES:
        mod = fresh.get_submodule(name)
        assert type(mod) is Conv1D and masks.is_masked(mod)
        assert torch.equal(mod.weight_mask, model.get_submodule(name).weight_mask)
    assert torch.equal(logits(fresh), logits(model))


def test_schedule_prunes_conv1d_while_training():
    """Iterative magnitude pruning in a training loop (Adam: momentum would move pruned weights
    without the masks' guards): pruned weights stay exactly zero, kept ones keep training."""
    model = tiny_gpt2().train()
    cfg = ts.Magnitude(sparsity=0.75)
    sched = ts.pruning.Schedule(model, cfg, start_step=1, end_step=4, frequency=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    targets = []
    for step in range(6):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched.step() is not None:
            targets.append(sched.current)
        for name in CONV1D_NAMES:
            mod = model.get_submodule(name)
            if masks.is_masked(mod):
                assert type(mod) is Conv1D
                assert not bool(mod.weight.detach()[~mod.weight_mask].any()), (step, name)
    assert targets[-1] == 0.75 and targets == sorted(targets) and len(targets) >= 2
    before_last = {n: model.get_submodule(n).weight.detach().clone() for n in CONV1D_NAMES}
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    for name in CONV1D_NAMES:
        mod = model.get_submodule(name)
        assert int((~mod.weight_mask).sum()) == round(0.75 * mod.weight.numel())
        assert not bool(mod.weight.detach()[~mod.weight_mask].any())
        assert not torch.equal(mod.weight.detach(), before_last[name])  # kept weights still train


def test_nan_weight_leaves_the_model_as_it_was():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[1, 2] = float("inf")
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj"):
        ts.prune(model, ts.Magnitude(sparsity=0.5, scope="global"), progress=False)
    assert not masks.masked_layers(model)
    assert_state_unchanged(model, before)


# ---------------------------------------------------------------- channels, neurons, heads

def expected_drops(model, block: int, n_neurons: int, n_heads: int):
    """(neurons, heads) an L1 ChannelPrune removes, from norms computed here: a neuron's score
    is its c_fc weight column + bias + mlp.c_proj weight row; a head's is its columns in the
    q, k and v thirds of c_attn (+ bias) + its attn.c_proj rows."""
    h = model.transformer.h[block]
    fc_w, fc_b, proj_w = (t.detach().double() for t in (h.mlp.c_fc.weight, h.mlp.c_fc.bias, h.mlp.c_proj.weight))
    neuron = fc_w.abs().sum(0) + fc_b.abs() + proj_w.abs().sum(1)
    at_w, at_b, ap_w = (t.detach().double() for t in (h.attn.c_attn.weight, h.attn.c_attn.bias, h.attn.c_proj.weight))
    head = torch.zeros(HEADS, dtype=torch.float64)
    for k in range(HEADS):
        cols = [part * EMBED + k * HEAD_DIM + r for part in range(3) for r in range(HEAD_DIM)]
        rows = slice(k * HEAD_DIM, (k + 1) * HEAD_DIM)
        head[k] = at_w[:, cols].abs().sum() + at_b[cols].abs().sum() + ap_w[rows].abs().sum()
    return (sorted(torch.argsort(neuron)[:n_neurons].tolist()), sorted(torch.argsort(head)[:n_heads].tolist()))


def head_columns(heads, width=EMBED):
    return [part * width + k * HEAD_DIM + r for part in range(3) for k in heads for r in range(HEAD_DIM)]


def zeroed_reference(model, drops):
    """The original model with the removed units' consumer rows (mlp.c_proj / attn.c_proj rows)
    zeroed: what the physically pruned model must compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for b, (neurons, heads) in drops.items():
            h = ref.transformer.h[b]
            h.mlp.c_proj.weight[neurons] = 0
            for k in heads:
                h.attn.c_proj.weight[k * HEAD_DIM:(k + 1) * HEAD_DIM] = 0
    return ref


def keep_of(drop, size):
    return [i for i in range(size) if i not in set(drop)]


def test_channel_prune_gpt2_neurons_and_heads(tmp_path):
    model = tiny_gpt2()
    orig = copy.deepcopy(model)
    drops = {b: expected_drops(model, b, INNER // 4, 1) for b in BLOCKS}
    report = ts.prune(model, ts.ChannelPrune(ratio=0.25, importance="l1"), progress=False)
    assert {c.name for c in report.changed} == CONV1D_NAMES
    assert all(c.module_type == "Conv1D" for c in report.changes) and not report.skipped
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in orig.parameters())
    for b, (neurons, heads) in drops.items():
        h, o = model.transformer.h[b], orig.transformer.h[b]
        kn = keep_of(neurons, INNER)
        assert (h.mlp.c_fc.nf, h.mlp.c_proj.nx) == (192, 192)
        assert torch.equal(h.mlp.c_fc.weight, o.mlp.c_fc.weight[:, kn])  # columns: output channels
        assert torch.equal(h.mlp.c_fc.bias, o.mlp.c_fc.bias[kn])
        assert torch.equal(h.mlp.c_proj.weight, o.mlp.c_proj.weight[kn, :])  # rows: input channels
        kh = keep_of(heads, HEADS)
        assert (h.attn.num_heads, h.attn.split_size, h.attn.c_attn.nf, h.attn.c_proj.nx) == (3, 48, 144, 48)
        assert torch.equal(h.attn.c_attn.weight, o.attn.c_attn.weight[:, head_columns(kh)])
        assert torch.equal(h.attn.c_attn.bias, o.attn.c_attn.bias[head_columns(kh)])
        rows = [k * HEAD_DIM + r for k in kh for r in range(HEAD_DIM)]
        assert torch.equal(h.attn.c_proj.weight, o.attn.c_proj.weight[rows])
        assert torch.equal(h.attn.c_proj.bias, o.attn.c_proj.bias)  # the residual stream stays whole
    torch.testing.assert_close(logits(model), logits(zeroed_reference(orig, drops)), rtol=1e-5, atol=1e-5)
    summary = {c.name: c for c in ts.summary(model).changes if c.action == "pruned"}
    assert set(summary) == CONV1D_NAMES and all(c.module_type == "Conv1D" for c in summary.values())
    assert summary["transformer.h.0.attn.c_attn"].reason == "nf=144; 'transformer.h.0.attn': num_heads 3, split_size 48"
    assert summary["transformer.h.1.mlp.c_proj"].reason == "nx=192"

    path = tmp_path / "gpt2.slim.safetensors"
    ts.save(model, path)
    fresh = tiny_gpt2(seed=5)
    ts.load(fresh, path)
    assert fresh.transformer.h[1].attn.num_heads == 3 and fresh.transformer.h[1].mlp.c_fc.weight.shape == (64, 192)
    assert torch.equal(logits(fresh), logits(model))


def test_channel_prune_gpt2_mlp_only():
    model = tiny_gpt2()
    orig = copy.deepcopy(model)
    drops = {b: (expected_drops(model, b, INNER // 2, 0)[0], []) for b in BLOCKS}
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0, importance="l1"), progress=False)
    assert {c.name for c in report.changed} == {n for n in CONV1D_NAMES if ".mlp." in n}
    for b, (neurons, _) in drops.items():
        h, o = model.transformer.h[b], orig.transformer.h[b]
        assert torch.equal(h.mlp.c_fc.weight, o.mlp.c_fc.weight[:, keep_of(neurons, INNER)])
        assert torch.equal(h.attn.c_attn.weight, o.attn.c_attn.weight) and h.attn.num_heads == HEADS
    torch.testing.assert_close(logits(model), logits(zeroed_reference(orig, drops)), rtol=1e-5, atol=1e-5)


def test_unknown_qkv_packing_is_skipped_with_its_reason():
    """An attention whose packed q / k / v the head rule cannot read keeps its heads, and the
    Report says why; its block's FFN and the other block's heads are still pruned."""
    model = tiny_gpt2()
    orig = copy.deepcopy(model)
    del model.transformer.h[0].attn.split_size  # a layout the rule does not know
    drops = {0: (expected_drops(orig, 0, INNER // 4, 0)[0], []), 1: expected_drops(orig, 1, INNER // 4, 1)}
    report = ts.prune(model, ts.ChannelPrune(ratio=0.25, importance="l1"), progress=False)
    skipped = [c for c in report.skipped]
    assert [(c.name, c.module_type) for c in skipped] == [("transformer.h.0.attn.c_attn", "Conv1D")]
    assert "packed q/k/v of 'transformer.h.0.attn'" in skipped[0].reason and "split_size" in skipped[0].reason
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, orig.transformer.h[0].attn.c_attn.weight)
    assert model.transformer.h[0].mlp.c_fc.nf == 192 and model.transformer.h[1].attn.num_heads == 3
    model.transformer.h[0].attn.split_size = EMBED  # the forward needs it back
    torch.testing.assert_close(logits(model), logits(zeroed_reference(orig, drops)), rtol=1e-5, atol=1e-5)


def test_scheduled_channel_masks_are_conv1d_columns():
    """Schedule with ChannelPrune masks whole output channels while training: zero COLUMNS of
    c_fc (and rows of mlp.c_proj), exactly the neurons the L1 norms computed here pick;
    finalize then removes them and computes what the masked model computed."""
    model = tiny_gpt2()
    drops = {b: expected_drops(model, b, INNER // 4, 0)[0] for b in BLOCKS}
    sched = ts.pruning.Schedule(model, ts.ChannelPrune(ratio=0.25, head_ratio=0, importance="l1"),
                                start_step=1, end_step=2, frequency=1)
    sched.step()
    assert sched.step() is not None
    for b, neurons in drops.items():
        fc, proj = model.transformer.h[b].mlp.c_fc, model.transformer.h[b].mlp.c_proj
        zero_cols = (~fc.weight_mask).all(0).nonzero().flatten().tolist()
        assert zero_cols == neurons and int((~fc.weight_mask).sum()) == len(neurons) * EMBED
        assert (~proj.weight_mask).all(1).nonzero().flatten().tolist() == neurons
    masked = logits(model)
    sched.finalize()
    assert all(type(model.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (EMBED, 192) and not masks.masked_layers(model)
    torch.testing.assert_close(logits(model), masked, rtol=1e-5, atol=1e-5)


def test_channel_prune_error_leaves_the_model_as_it_was():
    model = tiny_gpt2()
    before = state_copy(model)
    with pytest.raises(ValueError, match="head_ratio 0.9 leaves 0 of its 4 heads.*head_ratio=0 keeps every head"):
        ts.prune(model, ts.ChannelPrune(ratio=0.25, head_ratio=0.9), progress=False)
    assert_state_unchanged(model, before)
    assert model.transformer.h[0].mlp.c_fc.nf == INNER and model.transformer.h[0].attn.num_heads == HEADS


def test_conv1d_outside_transformer_blocks_through_the_fx_graph():
    """Conv1D in a plain module (no GPT-2 block): the traced channel graph treats it as the
    linear it is, with output channels in its weight columns; L2 importance computed here."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(32, 16), nn.GELU(), Conv1D(8, 32))  # Conv1D(out, in)
    with torch.no_grad():
        model[0].bias.normal_()
    orig = copy.deepcopy(model)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    w0, b0, w2 = (t.detach().double() for t in (orig[0].weight, orig[0].bias, orig[2].weight))
    score = w0.pow(2).sum(0) + b0.pow(2) + w2.pow(2).sum(1)
    drop = sorted(torch.argsort(score)[:16].tolist())
    keep = keep_of(drop, 32)
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, round_to=1, importance="l2"), example_inputs=x,
                      progress=False)
    assert {(c.name, c.module_type) for c in report.changed} == {("0", "Conv1D"), ("2", "Conv1D")}
    assert not report.skipped  # "2" loses its inputs; that its outputs stay is the pruned row's note
    assert [(c.name, c.reason) for c in report.changed if c.reason] == [
        ("2", "kept channels: coupled with the model output")]
    assert (model[0].nf, model[2].nx, model[2].nf) == (16, 16, 8)
    assert torch.equal(model[0].weight, orig[0].weight[:, keep]) and torch.equal(model[0].bias, orig[0].bias[keep])
    assert torch.equal(model[2].weight, orig[2].weight[keep, :])
    with torch.no_grad():
        orig[2].weight[drop] = 0
        torch.testing.assert_close(model(x), orig(x), rtol=1e-5, atol=1e-5)
