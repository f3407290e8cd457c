"""ts.pruning.Schedule: the Zhu & Gupta cubic curve against its formula, pruning only on
due steps, exact final sparsity, zeros kept between updates while training."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_cubic_curve_matches_the_paper():
    sched = ts.pruning.Schedule(_model(), ts.Magnitude(sparsity=0.9), start_step=10, end_step=110,
                                frequency=10, initial_sparsity=0.1)
    for t in (0, 9, 10, 35, 60, 110, 500):
        if t < 10:
            want = 0.0
        else:  # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, clamped after the end
            want = 0.9 + (0.1 - 0.9) * (1 - min(1.0, (t - 10) / 100)) ** 3
        assert sched.target(t) == pytest.approx(want, abs=1e-12)
    lin = ts.pruning.Schedule(_model(), ts.Magnitude(sparsity=0.8), 0, 100, 10, curve="linear")
    assert lin.target(50) == pytest.approx(0.4)


def test_schedule_prunes_gradually_while_training():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = ts.Magnitude(sparsity=0.8, scope="global")
    sched = ts.pruning.Schedule(model, cfg, start_step=5, end_step=45, frequency=10)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    seen = []
    for step in range(1, 61):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report = sched.step()
        assert (report is not None) == (step in (15, 25, 35, 45))  # step 5: target 0, nothing to do
        layers = [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, "weight_mask")]
        if layers:
            zeros = sum(int((m.weight == 0).sum()) for m in layers)
            total = sum(m.weight.numel() for m in layers)
            seen.append(zeros / total)
            # between updates the zeros stay, however Adam's moments push
            assert all(bool((m.weight[~m.weight_mask] == 0).all()) for m in layers)
    assert seen == sorted(seen)  # never un-prunes
    layers = [m for m in model.modules() if hasattr(m, "weight_mask")]
    pruned = sum(int((~m.weight_mask).sum()) for m in layers)
    assert pruned == round(0.8 * sum(m.weight.numel() for m in layers))  # exact at the end
    assert len(layers) == 3  # a Sequential's last layer is named "4", not a head


def test_state_dict_resumes():
    sched = ts.pruning.Schedule(_model(), ts.Magnitude(sparsity=0.5), 0, 10, 2)
    for _ in range(4):
        sched.step()
    other = ts.pruning.Schedule(_model(), ts.Magnitude(sparsity=0.5), 0, 10, 2)
    other.load_state_dict(sched.state_dict())
    assert other.step_count == 4 and other.current == sched.current > 0


def _train(model, opt, sched, steps):
    for step in steps:
        x = torch.randn(16, 16, generator=torch.Generator().manual_seed(step))
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_from_torch_checkpoints_matches_the_uninterrupted_run():
    """Model, optimizer and Schedule state_dicts (torch.save) loaded into fresh ones resume
    exactly: the fresh model takes the checkpoint's masks (strict load refused them before;
    strict=False dropped them and the pruned weights grew back)."""
    def build():
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        return model, opt, ts.pruning.Schedule(model, ts.Magnitude(sparsity=0.8, scope="global"), 2, 12, 2)

    full = build()
    _train(*full, range(0, 20))
    for stop in (7, 15):  # mid-schedule, and after its last update (masks only in the checkpoint)
        first = build()
        _train(*first, range(0, stop))
        ckpt = {k: copy.deepcopy(o.state_dict()) for k, o in zip(("model", "opt", "sched"), first)}
        resumed = build()
        for key, obj in zip(("model", "opt", "sched"), resumed):
            obj.load_state_dict(ckpt[key])
        _train(*resumed, range(stop, 20))
        for a, b in zip(full[0].state_dict().values(), resumed[0].state_dict().values()):
            assert torch.equal(a, b)
    assert abs(sum(int((m.weight == 0).sum()) for m in full[0] if isinstance(m, nn.Linear)) / 5376 - 0.8) < 1e-3


def test_structured_resume_keeps_the_channels_finalize_removes():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 16)
    sched = ts.pruning.Schedule(model, ts.ChannelPrune(ratio=0.5), 0, 4, 2, example_inputs=x)
    _train(model, opt, sched, range(0, 6))
    fresh = _model()
    resumed = ts.pruning.Schedule(fresh, ts.ChannelPrune(ratio=0.5), 0, 4, 2, example_inputs=x)
    fresh.load_state_dict(model.state_dict())
    resumed.load_state_dict(copy.deepcopy(sched.state_dict()))
    assert resumed.chosen == sched.chosen and resumed.chosen
    resumed.finalize()  # removed nothing before: the chosen channels were not in the state
    sched.finalize()
    assert fresh[0].out_features == model[0].out_features == 32 and torch.equal(fresh(x), model(x))


def test_a_schedule_that_prunes_nothing_warns():
    model = _model()
    ts.prepare_qat(model, ts.Int4WeightOnly(group_size=32))
    sched = ts.pruning.Schedule(model, ts.Magnitude(sparsity=0.5), 0, 4, 2)
    sched.step()
    with pytest.warns(UserWarning, match="Schedule.step .step 2.: nothing was compressed.*prepared for QAT"):
        sched.step()


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(start_step=10, end_step=10, frequency=1), ValueError, "start_step < end_step"),
    (dict(start_step=0, end_step=10, frequency=0), ValueError, "frequency"),
    (dict(start_step=0, end_step=10, frequency=1, curve="cosine"), ValueError, "curve"),
    (dict(start_step=0.5, end_step=10, frequency=1), TypeError, "start_step must be an int"),
    (dict(start_step=0, end_step=10, frequency=1, initial_sparsity=0.9), ValueError, "initial_sparsity"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        ts.pruning.Schedule(_model(), ts.Magnitude(sparsity=0.5), **kwargs)
    with pytest.raises(TypeError, match="pruning config"):
        ts.pruning.Schedule(_model(), ts.Int8WeightOnly(), 0, 10, 1)


def test_structured_schedule_masks_then_removes_channels():
    pytest.importorskip("sklearn")
    from tensorslim.eval import digits_cnn as D

    xtr, ytr, xte, yte = D.digits()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend
    model = D.DigitsResNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = ts.pruning.Schedule(model, ts.ChannelPrune(ratio=0.5), start_step=2, end_step=12, frequency=5,
                                example_inputs=xtr[:2])
    gen = torch.Generator().manual_seed(0)
    for _ in range(16):
        idx = torch.randint(0, len(xtr), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert model.block2.conv.weight.shape[0] == 32  # still full size, channels masked
    zero_rows = (model.block2.conv.weight.detach().abs().sum((1, 2, 3)) == 0).sum()
    assert int(zero_rows) == 16
    model.eval()
    with torch.no_grad():
        before = model(xte[:32])
    report = sched.finalize()
    assert model.block2.conv.weight.shape[0] == 16 and model.head.in_features == 16 and report.changed
    with torch.no_grad():  # removing the masked channels changes nothing
        assert torch.allclose(model(xte[:32]), before, atol=1e-4, rtol=1e-4)
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_first_steps_below_the_layer_floor_hold_every_layer_at_it(scope):
    """A schedule's early targets sit below min_layer_sparsity: both scopes keep each layer at its
    floor (global raised 'allow 806..2688 pruned weights, not 656' and stopped training), then
    follow the curve to the final sparsity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    cfg = ts.Magnitude(sparsity=0.9, scope=scope, min_layer_sparsity=0.3, skip_output_head=False)
    sched = ts.pruning.Schedule(model, cfg, start_step=0, end_step=10, frequency=1)
    sched.step()
    first = [float((m.weight == 0).float().mean()) for m in (model[0], model[2])]
    assert all(abs(f - 0.3) < 0.01 for f in first), first
    for _ in range(10):
        sched.step()
    total = sum(int((m.weight == 0).sum()) for m in (model[0], model[2]))
    assert total == round(0.9 * (32 * 64 + 64 * 10))


def test_heads_only_channel_schedule_prunes_the_heads():
    """ChannelPrune(ratio=0, head_ratio=0.5) under a schedule runs up to its head ratio, as one
    shot does (the schedule followed ratio = 0: it never fired and finalize removed nothing)."""
    pytest.importorskip("transformers")
    from tiny_gpt2 import tiny_gpt2

    cfg = ts.ChannelPrune(ratio=0.0, head_ratio=0.5)
    one_shot = tiny_gpt2()
    ts.prune(one_shot, cfg, progress=False)
    model = tiny_gpt2()
    sched = ts.pruning.Schedule(model, cfg, start_step=0, end_step=4, frequency=1)
    for _ in range(5):
        sched.step()
    sched.finalize()
    heads = [b.attn.num_heads for b in model.transformer.h]
    assert heads == [b.attn.num_heads for b in one_shot.transformer.h] and heads[0] < 4
