"""hidden_loss / attention_loss against their formulas written out, and the Distiller in a
training loop: frozen eval teacher without a graph, hooks by name, learned projections,
gradient accumulation, bf16 autocast and a QAT student."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts


def test_hidden_loss_mse_cosine_and_projection():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 16, generator=g), torch.randn(4, 6, 16, generator=g)
    want_mse = ((s.double() - t.double()) ** 2).mean()
    torch.testing.assert_close(ts.distill.hidden_loss(s, t).double(), want_mse)
    cos = (s.double() * t.double()).sum(-1) / (s.double().norm(dim=-1) * t.double().norm(dim=-1))
    torch.testing.assert_close(ts.distill.hidden_loss(s, t, "cosine").double(), (1 - cos).mean())
    proj = ts.distill.HiddenProjection(8, 16)
    s8 = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    loss = ts.distill.hidden_loss(s8, t, "mse", proj)
    torch.testing.assert_close(loss, F.mse_loss(s8 @ proj.proj.weight.T, t))
    loss.backward()
    assert proj.proj.weight.grad is not None and s8.grad is not None
    with pytest.raises(ValueError, match="width 8 but teacher_hidden has 16.*HiddenProjection"):
        ts.distill.hidden_loss(s8, t)
    with pytest.raises(ValueError, match="kind must be one of"):
        ts.distill.hidden_loss(s, t, "l1")


def test_attention_loss_kl_mse_and_head_groups():
    g = torch.Generator().manual_seed(1)
    s_scores, t_scores = torch.randn(2, 2, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    ps, pt = s_scores.double().softmax(-1), t_scores.double().softmax(-1)
    pt_grouped = pt.reshape(2, 2, 2, 5, 5).mean(2)  # teacher heads (0,1) -> student head 0, (2,3) -> 1
    want_kl = (pt_grouped * (pt_grouped.log() - ps.log())).sum(-1).mean()
    torch.testing.assert_close(ts.distill.attention_loss(ps.float(), pt.float()).double(), want_kl,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ts.distill.attention_loss(s_scores, t_scores, from_logits=True).double(),
                               want_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ts.distill.attention_loss(ps.float(), pt.float(), "mse").double(),
                               ((ps - pt_grouped) ** 2).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not a multiple"):
        ts.distill.attention_loss(torch.rand(2, 3, 5, 5), torch.rand(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\[batch, heads, queries, keys\]"):
        ts.distill.attention_loss(torch.rand(2, 5, 5), torch.rand(2, 4, 5, 5))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_masked_keys_of_a_grouped_teacher_add_nothing(backend):
    """Scores masked with finfo.min (the documented way) on a teacher with more heads: the
    loss is the one over the keys that exist (it was ~1e26: a 1e-12 probability floor on the
    grouped teacher times the log-ratio to a masked student score)."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 2, 3, 6, generator=g), torch.randn(2, 4, 3, 6, generator=g)
    masked = torch.zeros(3, 6, dtype=torch.bool)
    masked[:, 4:] = True
    fill = torch.finfo(torch.float32).min
    sm = s.masked_fill(masked, fill).requires_grad_(True)
    loss = ts.distill.attention_loss(sm, t.masked_fill(masked, fill), from_logits=True, backend=backend)
    sk = s[..., :4].clone().requires_grad_(True)
    want = ts.distill.attention_loss(sk, t[..., :4], from_logits=True, backend="reference")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    loss.backward()
    want.backward()
    torch.testing.assert_close(sm.grad[..., :4], sk.grad, rtol=1e-5, atol=1e-8)
    assert not sm.grad[..., 4:].any()


class Net(nn.Module):
    def __init__(self, width, depth=2, drop=0.0):
        super().__init__()
        layers, d = [], 20
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU(), nn.Dropout(drop)]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.body(x))


def _pair(seed=0):
    torch.manual_seed(seed)
    return Net(16), Net(32, depth=3, drop=0.5)


def test_distiller_freezes_teacher_and_keeps_no_graph():
    student, teacher = _pair()
    d = ts.distill.Distiller(student, teacher, losses={"kd": 1.0, "hidden": 0.5},
                             feature_map={"body.0": "body.3"}, temperature=2.0)
    d.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    names = {n for n, _ in d.named_parameters()}
    assert not any(n.startswith("teacher") for n in names) and "projections.0.proj.weight" in names
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    out = d(x, labels=y)
    assert set(out.terms) == {"kd", "hidden.0"}
    torch.testing.assert_close(out.loss, out.terms["kd"] + 0.5 * out.terms["hidden.0"])
    # the teacher in eval mode: the same output twice despite its dropout
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), teacher(x))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.body[0].weight.grad is not None and d.projections["0"].proj.weight.grad is not None
    # the KD term is kd_loss on the two models' logits
    with torch.no_grad():
        want = ts.distill.kd_loss(student(x), teacher(x), temperature=2.0, labels=y, alpha=0.5)
    torch.testing.assert_close(out.terms["kd"], want)
    with pytest.raises(ValueError, match="the teacher has no module 'body.9'"):
        ts.distill.Distiller(student, teacher, losses={"hidden": 1.0}, feature_map={"body.0": "body.9"})


def test_distiller_gradient_accumulation():
    """Two half batches, each loss halved, give the full batch's gradient (batchmean)."""
    student, teacher = _pair(1)
    d = ts.distill.Distiller(student, teacher, losses={"kd": 1.0, "hidden": 1.0},
                             feature_map={"body.3": "body.6"}, temperature=3.0)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    d(x, labels=y).loss.backward()
    full = [p.grad.clone() for p in d.parameters()]
    d.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):
        (d(x[half], labels=y[half]).loss / 2).backward()
    for a, b in zip(full, (p.grad for p in d.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_distiller_bf16_autocast():
    student, teacher = _pair(2)
    d = ts.distill.Distiller(student, teacher, temperature=2.0)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    ref = d(x, labels=y).loss.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(x, labels=y)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert torch.isfinite(student.head.weight.grad).all()
    assert abs(float(out.loss.detach()) - float(ref)) <= 0.05 * abs(float(ref)) + 1e-3


def _assert_trains(d, x, y, steps: int = 30):
    """Adam steps through the Distiller bring the loss below 0.8x its first value."""
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    first = None
    for _ in range(steps):
        loss = d(x, labels=y).loss
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.8 * first


def test_distiller_with_qat_student():
    """A student under fake quantization (ts.prepare_qat) trains through the Distiller."""
    student, teacher = _pair(3)
    ts.prepare_qat(student, ts.Int4WeightOnly(group_size=None), progress=False)
    assert any(isinstance(m, ts.QATLinear) for m in student.modules())
    d = ts.distill.Distiller(student, teacher, losses={"kd": 1.0, "hidden": 0.1},
                             feature_map={"body.0": "body.0"}, temperature=2.0,
                             example_inputs=(torch.randn(2, 20),))
    _assert_trains(d, torch.randn(64, 20), torch.randint(0, 5, (64,)))


@pytest.mark.parametrize("compress", ["pruned", "factorized"])
def test_distiller_with_pruned_or_factorized_student(compress):
    """A structurally pruned (ts.prune) or factorized (ts.factorize) student trains through
    the Distiller, and the hidden loss's projection takes the compressed layer's width."""
    student, teacher = _pair(4)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    if compress == "pruned":
        ts.prune(student, ts.ChannelPrune(ratio=0.5, round_to=4), calib_data=[x[:8]], progress=False)
        assert student.body[0].out_features == 8  # 16 hidden units, half removed
    else:
        ts.factorize(student, ts.SVD(rank=4, include=["body.3"], skip_output_head=False), progress=False)
        assert isinstance(student.body[3], ts.LowRankLinear)
    d = ts.distill.Distiller(student, teacher, losses={"kd": 1.0, "hidden": 0.1},
                             feature_map={"body.3": "body.3"}, temperature=2.0,
                             example_inputs=(torch.randn(2, 20),))
    _assert_trains(d, x, y)


def _hook_count(*modules):
    return sum(len(m._forward_hooks) for model in modules for m in model.modules())


def test_distiller_arguments_are_checked_before_anything_changes():
    student, teacher = _pair()
    for kwargs, match in [(dict(losses={"kd": float("nan")}), "finite number >= 0"),
                          (dict(losses={}), "names no loss"),
                          (dict(temperature=-1.0), "temperature must be"),
                          (dict(alpha=7), "alpha must be"),
                          (dict(losses={"hidden": 1.0}, feature_map={"body.0": "nope"}), "teacher has no module")]:
        with pytest.raises(ValueError, match=match):
            ts.distill.Distiller(student, teacher, **kwargs)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # untouched


def test_a_distiller_that_fails_leaves_no_hooks_and_one_that_closes_removes_them():
    student, teacher = _pair()
    # widths the modules do not tell: the projection cannot be built without example inputs
    with pytest.raises(ValueError, match="cannot tell the widths"):
        ts.distill.Distiller(student, teacher, losses={"hidden": 1.0}, feature_map={"body": "body"})
    assert _hook_count(student, teacher) == 0
    with ts.distill.Distiller(student, teacher, losses={"kd": 1.0, "hidden": 1.0},
                              feature_map={"body.0": "body.3"}) as d:
        assert _hook_count(student, teacher) == 2
        d(torch.randn(4, 20))
    assert _hook_count(student, teacher) == 0
    with pytest.raises(ValueError, match="'body.0' did not run in this forward"):
        d(torch.randn(4, 20))
