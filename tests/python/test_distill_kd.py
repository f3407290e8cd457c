"""ts.distill.kd_loss against explainable references: the same loss in plain PyTorch run in
float64 (itself gradchecked), and the usual fp32 / bf16 log_softmax + kl_div expression.

Tolerances (docs/distill.md): the core computes in fp32 with double sums per chunk; its
vectorized exp is a degree-7 polynomial (< 1e-7 relative). Against float64 on the same
inputs: loss within 2e-5 relative, gradient within 2e-5 of its largest entry.
"""
import pytest
import torch
import torch.nn.functional as F

import tensorslim as ts
from tensorslim.ops import distill as kd_ops

LOSS_RTOL = 2e-5
GRAD_RTOL = 2e-5


def _logits(rows, vocab, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    t = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    return s, t


def _ours(s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = ts.distill.kd_loss(s, t, backend="native", **kw)
    loss.sum().backward()
    return loss.detach(), s.grad


def _float64(s, t, **kw):
    s = s.detach().double().requires_grad_(True)
    loss = ts.distill.kd_loss(s, t.double(), backend="reference", **kw)
    loss.sum().backward()
    return loss.detach(), s.grad


def _close(got, want, rtol, what):
    got, want = got.double(), want.double()
    err = float((got - want).abs().max())
    bound = rtol * max(float(want.abs().max()), 1e-30)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


MODES = [
    dict(temperature=2.0),
    dict(temperature=4.0, reverse=True),
    dict(temperature=1.0, labels=True, alpha=0.3),
    dict(temperature=3.0, labels=True, alpha=0.7, reverse=True),
    dict(temperature=2.0, top_k=50),
    dict(temperature=2.0, top_k=7, labels=True, alpha=0.5),
    dict(temperature=0.5, labels=True, alpha=1.0, reduction="sum"),
    dict(temperature=1.5, labels=True, alpha=0.0, reduction="mean"),
    dict(temperature=2.0, reduction="none", labels=True),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_matches_float64_reference(isa, mode):
    rows, vocab = 6, 4133  # three vocabulary chunks and a tail that is not a multiple of 16
    s, t = _logits(rows, vocab, 3.0, 1)
    kw = dict(mode)
    if kw.pop("labels", False):
        y = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(2))
        y[2] = -100
        kw["labels"] = y
    got_loss, got_grad = _ours(s, t, **kw)
    want_loss, want_grad = _float64(s, t, **kw)
    _close(got_loss, want_loss, LOSS_RTOL, "loss")
    _close(got_grad, want_grad, GRAD_RTOL, "grad")
    if "labels" in kw:
        assert torch.all(got_grad[2] == 0), "an ignored row must get no gradient"


@pytest.mark.parametrize("mode", MODES[:6], ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_reference_gradcheck_float64(mode):
    """The float64 reference our gradients are compared with is itself right (gradcheck)."""
    rows, vocab = 3, 11
    s, t = _logits(rows, vocab, 2.0, 3, torch.float64)
    kw = dict(mode)
    if kw.pop("labels", False):
        kw["labels"] = torch.tensor([1, -100, 10])
    if "top_k" in kw:
        kw["top_k"] = min(kw["top_k"], 5)
    fn = lambda x: ts.distill.kd_loss(x, t, backend="reference", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(True),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_native_gradcheck_float64(mode):
    """gradcheck on the native Function itself: float64 logits run the core's scalar reference
    in double (forward and backward), the same code the fp32 paths are tested against."""
    rows, vocab = 3, 11
    s, t = _logits(rows, vocab, 2.0, 3, torch.float64)
    kw = dict(mode)
    if kw.pop("labels", False):
        kw["labels"] = torch.tensor([1, -100, 10])
    if "top_k" in kw:
        kw["top_k"] = min(kw["top_k"], 5)
    fn = lambda x: ts.distill.kd_loss(x, t, backend="native", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_native_float64_chunks_equal_reference():
    """The float64 path across several vocabulary chunks (online log-sum-exp frame shifts)
    equals the PyTorch float64 expression to rounding, at an extreme temperature too."""
    s, t = _logits(3, 5000, 6.0, 4, torch.float64)
    y = torch.tensor([4, -100, 4999])
    for kw in (dict(temperature=0.1), dict(temperature=3.0, reverse=True, labels=y, alpha=0.4),
               dict(temperature=2.0, top_k=40, labels=y)):
        got_loss, got_grad = _ours(s, t, **kw)
        want_loss, want_grad = _float64(s, t, **kw)
        assert got_loss.dtype == torch.float64 and got_grad.dtype == torch.float64
        _close(got_loss, want_loss, 1e-12, f"{kw} loss")
        _close(got_grad, want_grad, 1e-11, f"{kw} grad")


def test_native_gradient_matches_finite_differences():
    """Our C++ backward against central differences of our own C++ forward (fp32, so a
    coarse step and a loose tolerance; the float64 comparison above is the tight one)."""
    s, t = _logits(4, 300, 1.0, 5)
    y = torch.tensor([3, 299, -100, 0])
    kw = dict(temperature=2.0, labels=y, alpha=0.4)
    _, grad = _ours(s, t, **kw)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        d = torch.randn(s.shape, generator=g)
        h = 1e-2
        fd = (ts.distill.kd_loss(s + h * d, t, **kw) - ts.distill.kd_loss(s - h * d, t, **kw)) / (2 * h)
        assert abs(float(fd) - float((grad * d).sum())) <= 2e-3 * max(1.0, abs(float(fd)))


def _plain_torch(s, t, T):
    """The expression users write today (Hinton et al. 2015)."""
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * T * T


@pytest.mark.parametrize("T", [0.05, 1.0, 30.0])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_extreme_temperature_and_scale_fp32(isa, T, scale):
    s, t = _logits(4, 3001, scale, 7)
    got_loss, got_grad = _ours(s, t, temperature=T)
    want_loss, want_grad = _float64(s, t, temperature=T)
    assert torch.isfinite(got_loss).all() and torch.isfinite(got_grad).all()
    # The plain fp32 expression's own error at this point, which ours must not exceed by much.
    sp = s.clone().requires_grad_(True)
    plain = _plain_torch(sp, t, T)
    plain.backward()
    plain = plain.detach()
    loss_tol = max(LOSS_RTOL * abs(float(want_loss)), 2 * abs(float(plain) - float(want_loss)))
    assert abs(float(got_loss) - float(want_loss)) <= loss_tol + 1e-6
    grad_tol = max(GRAD_RTOL * float(want_grad.abs().max()), 2 * float((sp.grad.double() - want_grad).abs().max()))
    assert float((got_grad.double() - want_grad).abs().max()) <= grad_tol + 1e-9


@pytest.mark.parametrize("T,scale", [(1.0, 1.0), (4.0, 10.0), (0.1, 1e4)])
def test_bf16_logits(isa, T, scale):
    """bf16 in, fp32 inside: the loss matches float64 on the same (bf16) values tightly;
    the gradient comes back in bf16, so it matches to bf16 rounding (2^-8 relative)."""
    s, t = _logits(5, 2500, scale, 9, torch.bfloat16)
    got_loss, got_grad = _ours(s, t, temperature=T)
    want_loss, want_grad = _float64(s.float(), t.float(), temperature=T)
    assert got_grad.dtype == torch.bfloat16
    _close(got_loss, want_loss, LOSS_RTOL, "loss")
    _close(got_grad, want_grad, 2 ** -7, "grad")
    # The plain expression in bf16 is far less accurate than ours.
    plain = _plain_torch(s, t, T).double()
    assert abs(float(got_loss) - float(want_loss)) <= max(abs(float(plain) - float(want_loss)), 1e-6)


def test_matches_plain_torch_expression_fp32():
    s, t = _logits(64, 1000, 2.0, 11)
    sa = s.clone().requires_grad_(True)
    sb = s.clone().requires_grad_(True)
    ts.distill.kd_loss(sa, t, temperature=4.0).backward()
    _plain_torch(sb, t, 4.0).backward()
    torch.testing.assert_close(ts.distill.kd_loss(s, t, temperature=4.0), _plain_torch(s, t, 4.0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_sequence_logits_reductions_and_ignore_index(reduction):
    """[batch, seq, vocab] logits with padded tokens, as in language-model distillation."""
    g = torch.Generator().manual_seed(13)
    s = torch.randn(3, 5, 777, generator=g)
    t = torch.randn(3, 5, 777, generator=g)
    y = torch.randint(0, 777, (3, 5), generator=g)
    y[0, 3:] = -1
    y[2, 1] = -1
    kw = dict(temperature=2.0, labels=y, ignore_index=-1, reduction=reduction)
    got_loss, got_grad = _ours(s, t, **kw)
    want_loss, want_grad = _float64(s, t, **kw)
    assert got_loss.shape == want_loss.shape == ((3, 5) if reduction == "none" else ())
    _close(got_loss, want_loss, LOSS_RTOL, "loss")
    _close(got_grad, want_grad, GRAD_RTOL, "grad")
    assert torch.all(got_grad[0, 3:] == 0) and torch.all(got_grad[2, 1] == 0)
    if reduction == "mean":  # divides by the 12 tokens that are not padding
        rows = ts.distill.kd_loss(s, t, **{**kw, "reduction": "sum"})
        torch.testing.assert_close(got_loss, rows / 12)


def test_mixed_dtypes_and_strided_input():
    s, t = _logits(8, 600, 2.0, 15)
    wide = torch.randn(8, 1200)
    wide[:, ::2] = s
    strided = wide[:, ::2]  # vocabulary stride 2: copied to unit stride before the core
    loss = ts.distill.kd_loss(strided, t.bfloat16(), temperature=2.0)
    want = ts.distill.kd_loss(s.double(), t.bfloat16().double(), temperature=2.0, backend="reference")
    assert abs(float(loss) - float(want)) <= LOSS_RTOL * abs(float(want))


def test_top_k_equals_full_when_k_is_vocab():
    s, t = _logits(4, 513, 2.0, 17)
    full = ts.distill.kd_loss(s, t, temperature=3.0)
    topk = ts.distill.kd_loss(s, t, temperature=3.0, top_k=513)
    torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_fake_impl():
    s, t = _logits(3, 40, 1.0, 19)
    t.requires_grad_(True)
    s.requires_grad_(True)
    ts.distill.kd_loss(s, t, temperature=2.0).backward()
    assert t.grad is None and s.grad is not None
    y = torch.tensor([0, 5, 39], dtype=torch.int32)
    torch.library.opcheck(kd_ops._kd_forward, (s.detach(), t.detach(), y, None, 2.0, 0.5, False, -100),
                          test_utils=("test_schema", "test_faketensor"))
    with torch.device("meta"):
        rows, stats = kd_ops._kd_forward(torch.empty(7, 10), torch.empty(7, 10), None, None, 1.0, 0.5, False, -100)
    assert rows.shape == (7,) and stats.shape == (7, kd_ops.KD_STATS)


# ------------------------------------------------------------------ bad input


def _raises(match, *args, exc=ValueError, **kw):
    with pytest.raises(exc, match=match):
        ts.distill.kd_loss(*args, **kw)


def test_bad_shapes_and_vocab():
    s, t = _logits(4, 10, 1.0, 21)
    _raises("vocabulary mismatch.*student_logits has 10.*teacher_logits has 12", s, torch.randn(4, 12))
    _raises("teacher_logits: expected shape", s, torch.randn(5, 10))
    _raises("labels: expected shape", s, t, labels=torch.zeros(5, dtype=torch.long))
    _raises("labels: expected integer", s, t, labels=torch.zeros(4), exc=TypeError)
    _raises("student_logits: expected float", torch.zeros(4, 10, dtype=torch.long), t, exc=TypeError)


@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(T):
    s, t = _logits(2, 10, 1.0, 23)
    _raises("temperature must be a finite number > 0", s, t, temperature=T)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_labels_out_of_range(backend):
    s, t = _logits(3, 10, 1.0, 25)
    _raises(r"labels: value 10 .*out of range \[0, 10\)", s, t, labels=torch.tensor([0, 10, 2]), backend=backend)
    _raises(r"labels: value -5 .*out of range", s, t, labels=torch.tensor([0, -5, 2]), backend=backend)
    _raises("labels: values must be class indices", s, t, labels=torch.tensor([0, 2 ** 40, 2]))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logits_name_the_tensor(backend, bad):
    s, t = _logits(3, 5000, 1.0, 27)
    s2 = s.clone()
    s2[1, 4321] = bad
    _raises("student_logits contains NaN or Inf", s2, t, backend=backend)
    t2 = t.clone()
    t2[2, 7] = bad
    _raises("teacher_logits contains NaN or Inf", s, t2, backend=backend)


def test_bad_options():
    s, t = _logits(2, 10, 1.0, 29)
    _raises("top_k needs the forward KL", s, t, top_k=3, reverse=True)
    _raises(r"top_k must be an int in \[1, vocab=10\]", s, t, top_k=11)
    _raises(r"alpha must be in \[0, 1\]", s, t, alpha=1.5)
    _raises("reduction must be one of", s, t, reduction="avg")


def test_per_row_weights_reach_the_core_and_edge_shapes():
    """reduction='none' with an arbitrary upstream gradient (negative, zero), one-row 1-D
    logits, and empty input."""
    s, t = _logits(4, 300, 1.0, 31)
    w = torch.tensor([0.5, -2.0, 3.0, 0.0])
    sa = s.clone().requires_grad_(True)
    (ts.distill.kd_loss(sa, t, temperature=2.0, reduction="none") * w).sum().backward()
    sd = s.double().requires_grad_(True)
    (ts.distill.kd_loss(sd, t.double(), temperature=2.0, reduction="none", backend="reference") * w.double()).sum().backward()
    _close(sa.grad, sd.grad, GRAD_RTOL, "grad")
    assert torch.all(sa.grad[3] == 0)
    one = ts.distill.kd_loss(s[0], t[0], labels=torch.tensor(3), temperature=2.0)
    torch.testing.assert_close(one, ts.distill.kd_loss(s[:1], t[:1], labels=torch.tensor([3]), temperature=2.0))
    empty = torch.zeros(0, 10, requires_grad=True)
    assert float(ts.distill.kd_loss(empty, torch.zeros(0, 10)).detach()) == 0.0
