"""hidden_loss / attention_loss in the native core: gradcheck on the real autograd Functions
(float64 inputs run the scalar C++ reference in double), the fp32 paths on every ISA against
the plain-PyTorch expression in float64 on odd sizes, bf16 / fp16 inputs, and bad input.

Tolerances: the fp32 core sums lanes in fp32 over chunks of at most 2048 values and adds the
chunks in double; its exp / log are polynomials (< 1e-7 relative). Against float64 on the same
inputs: loss within 2e-5 relative, gradient within 2e-5 of its largest entry (as kd_loss).
"""
import math

import pytest
import torch

import tensorslim as ts
from tensorslim.ops import distill_features as feat_ops

RTOL = 2e-5
hidden_loss, attention_loss = ts.distill.hidden_loss, ts.distill.attention_loss


def _close(got, want, rtol, what):
    got, want = got.double(), want.double()
    err = float((got - want).abs().max())
    bound = rtol * max(float(want.abs().max()), 1e-30)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _loss_and_grad(fn, s, *args, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kw)
    (loss * 1.7).backward()
    return loss.detach(), s.grad


def _attn(shape, from_logits, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    x = x if from_logits else x.softmax(-1)
    return x.to(dtype)


# ---- gradcheck on the native Functions (float64 = the C++ scalar reference in double) ----

@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_gradcheck_native(kind):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: hidden_loss(x, t, kind, backend="native"), (s,), eps=1e-6, atol=1e-8)


def test_hidden_gradcheck_through_projection():
    """The projection stays an nn.Linear feeding the C++ loss; gradcheck covers both."""
    torch.manual_seed(1)
    proj = ts.distill.HiddenProjection(5, 8).double()
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 8, dtype=torch.float64)
    w = proj.proj.weight

    def fn(x, weight):
        return hidden_loss(x @ weight.T, t, "cosine", backend="native")

    assert torch.autograd.gradcheck(fn, (s, w), eps=1e-6, atol=1e-8)
    loss = hidden_loss(s, t, "mse", proj, backend="native")
    loss.backward()
    assert w.grad is not None and s.grad is not None


ATTN_MODES = [("kl", False, 2), ("kl", True, 2), ("mse", False, 2), ("mse", True, 2),
              ("kl", True, 4), ("kl", False, 4), ("mse", True, 4)]


@pytest.mark.parametrize("kind,from_logits,teacher_heads", ATTN_MODES)
def test_attention_gradcheck_native(kind, from_logits, teacher_heads):
    s = _attn((2, 2, 3, 7), from_logits, 2).requires_grad_(True)
    t = _attn((2, teacher_heads, 3, 7), from_logits, 3)
    fn = lambda x: attention_loss(x, t, kind, from_logits, backend="native")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


def test_float64_native_equals_reference():
    """The float64 path computes the same numbers as the PyTorch expression (to rounding)."""
    s, t = _attn((2, 3, 4, 9), True, 4), _attn((2, 3, 4, 9), True, 5)
    for kind in ("kl", "mse"):
        for fl in (False, True):
            a = s if fl else s.softmax(-1)
            b = t if fl else t.softmax(-1)
            got, gg = _loss_and_grad(attention_loss, a, b, kind, fl, backend="native")
            want, gw = _loss_and_grad(attention_loss, a, b, kind, fl, backend="reference")
            _close(got, want, 1e-12, f"{kind} {fl} loss")
            _close(gg, gw, 1e-11, f"{kind} {fl} grad")


# ---- fp32 on every ISA against float64, odd sizes ----

@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 7, 33), (2, 2059)])
def test_hidden_fp32_matches_float64(isa, kind, shape):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
    got, gg = _loss_and_grad(hidden_loss, s, t, kind, backend="native")
    want, gw = _loss_and_grad(hidden_loss, s.double(), t.double(), kind, backend="reference")
    assert got.dtype == torch.float32 and gg.dtype == torch.float32
    _close(got, want, RTOL, "loss")
    _close(gg, gw, RTOL, "grad")


@pytest.mark.parametrize("kind,from_logits,teacher_heads", ATTN_MODES)
@pytest.mark.parametrize("keys", [1, 15, 129, 2061])
def test_attention_fp32_matches_float64(isa, kind, from_logits, teacher_heads, keys):
    s = _attn((2, 2, 3, keys), from_logits, 8, torch.float32)
    t = _attn((2, teacher_heads, 3, keys), from_logits, 9, torch.float32)
    if not from_logits:
        s[..., ::5] = 0  # exact zeros, as masks give: the 1e-12 floor
    got, gg = _loss_and_grad(attention_loss, s, t, kind, from_logits, backend="native")
    want, gw = _loss_and_grad(attention_loss, s.double(), t.double(), kind, from_logits, backend="reference")
    _close(got, want, RTOL, "loss")
    _close(gg, gw, RTOL, "grad")


@pytest.mark.parametrize("scale", [1e-3, 1.0, 80.0])
def test_attention_scores_any_scale(isa, scale):
    """Scores far beyond exp's range are handled by the log-sum-exp (no inf / nan)."""
    s = _attn((1, 2, 4, 50), True, 10, torch.float32) * scale
    t = _attn((1, 2, 4, 50), True, 11, torch.float32) * scale
    got, gg = _loss_and_grad(attention_loss, s, t, "kl", True)
    want, gw = _loss_and_grad(attention_loss, s.double(), t.double(), "kl", True, backend="reference")
    plain, gp = _loss_and_grad(attention_loss, s, t, "kl", True, backend="reference")  # fp32 PyTorch
    assert torch.isfinite(got) and torch.isfinite(gg).all()
    # Within RTOL, or no worse than twice the plain fp32 expression: at scale 1e-3 the KL
    # (~1e-6) is a difference of log-probabilities of size ~log(50), which fp32 cannot resolve
    # better than about one rounding step of those (eps * log 50 = 4.7e-7; torch's own fp32
    # error there depends on the machine's kernels, so it alone is no bound).
    ulp_floor = {"loss": torch.finfo(torch.float32).eps * math.log(s.shape[-1]), "grad": 0.0}
    for a, b, p, what in ((got, want, plain, "loss"), (gg, gw, gp, "grad")):
        err = float((a.double() - b).abs().max())
        assert err <= max(RTOL * float(b.abs().max()), 2 * float((p.double() - b).abs().max()),
                          ulp_floor[what]), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_fp32(dtype):
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(4, 6, 40, generator=g).to(dtype), torch.randn(4, 6, 40, generator=g).to(dtype)
    for kind in ("mse", "cosine"):
        got, gg = _loss_and_grad(hidden_loss, s, t, kind)
        want, gw = _loss_and_grad(hidden_loss, s.float(), t.float(), kind)
        assert got.dtype == torch.float32 and gg.dtype == dtype
        _close(got, want, 1e-6, f"{kind} loss")  # same values, so the same fp32 result
        _close(gg, gw.to(dtype), 1e-2, f"{kind} grad")  # the gradient rounded once to {dtype}
    a, b = _attn((2, 2, 3, 21), True, 13, dtype), _attn((2, 4, 3, 21), True, 14, dtype)
    got = attention_loss(a, b, "kl", True)
    want = attention_loss(a.float(), b.float(), "kl", True)
    _close(got, want, 1e-6, "attention")


def test_mixed_and_strided_inputs():
    g = torch.Generator().manual_seed(15)
    base = torch.randn(6, 40, generator=g)
    s = base[:, ::2]  # stride 2 along the width: copied to rows first
    t = torch.randn(6, 20, generator=g, dtype=torch.float64)  # the teacher follows the student's precision
    _close(hidden_loss(s, t, "cosine"), hidden_loss(s.double(), t, "cosine", backend="reference"), RTOL, "loss")
    st = torch.randn(4, 3, 2, 8, generator=g).transpose(1, 2)  # a non-contiguous [B, H, Q, K]
    tt = torch.randn(4, 2, 3, 8, generator=g)
    _close(attention_loss(st, tt, "mse", True), attention_loss(st.double(), tt.double(), "mse", True,
                                                                backend="reference"), RTOL, "attention")


def test_teacher_gets_no_gradient_and_fake_impl():
    s = torch.randn(3, 8, requires_grad=True)
    t = torch.randn(3, 8, requires_grad=True)
    hidden_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    with torch._subclasses.fake_tensor.FakeTensorMode():
        a, b = torch.empty(5, 7), torch.empty(5, 7)
        rows, stats = feat_ops._hidden_forward(a, b, 0, 1e-8)
        assert rows.shape == (5,) and stats.shape == (5, feat_ops.HIDDEN_STATS)
        rows, stats = feat_ops._attention_forward(a, b, 0, True, True)
        assert stats.shape == (5, feat_ops.ATTENTION_STATS)


def test_cosine_zero_row():
    """cosine of a zero row is 0 (loss 1) with the eps floor, and its gradient is finite."""
    s = torch.zeros(2, 5, requires_grad=True)
    t = torch.randn(2, 5)
    loss = hidden_loss(s, t, "cosine")
    loss.backward()
    assert float(loss.detach()) == pytest.approx(1.0) and torch.isfinite(s.grad).all()


# ---- bad input ----

@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_names_the_tensor(backend, which, bad):
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    (s if which == "student" else t)[1, 2, 5] = bad
    with pytest.raises(ValueError, match=f"hidden_loss: {which}_hidden contains NaN or Inf"):
        hidden_loss(s, t, backend=backend)
    a, b = _attn((1, 2, 3, 8), True, 1, torch.float32), _attn((1, 2, 3, 8), True, 2, torch.float32)
    (a if which == "student" else b)[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"attention_loss: {which}_attn contains NaN or Inf"):
        attention_loss(a, b, "kl", True, backend=backend)


def test_shape_mismatch_names_the_tensors():
    with pytest.raises(ValueError, match=r"teacher_hidden: expected shape \(4, 8\) like the \(projected\) "
                                         r"student_hidden, got \(5, 8\)"):
        hidden_loss(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="width 8 but teacher_hidden has 6"):
        hidden_loss(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"teacher_attn: expected \[batch, heads, queries, keys\] = "
                                         r"\[2, \*, 3, 5\] like student_attn, got \(2, 2, 3, 6\)"):
        attention_loss(torch.rand(2, 2, 3, 5), torch.rand(2, 2, 3, 6))
    with pytest.raises(ValueError, match="teacher_attn has 3 heads, not a multiple of the student's 2"):
        attention_loss(torch.rand(2, 2, 3, 5), torch.rand(2, 3, 3, 5))


def test_empty_and_wrong_dtype():
    with pytest.raises(ValueError, match=r"student_hidden: expected a non-empty tensor, got shape \(0, 8\)"):
        hidden_loss(torch.empty(0, 8), torch.empty(0, 8))
    with pytest.raises(ValueError, match="teacher_attn: expected a non-empty tensor"):
        attention_loss(torch.rand(1, 1, 2, 2), torch.empty(1, 1, 2, 0))
    with pytest.raises(TypeError, match="hidden_loss: teacher_hidden: expected a float tensor, got torch.int64"):
        hidden_loss(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_loss: student_attn: expected a torch.Tensor, got list"):
        attention_loss([[0.5]], torch.rand(1, 1, 1, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        hidden_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")
    with pytest.raises(TypeError, match="from_logits must be a bool"):
        attention_loss(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), from_logits="yes")
    with pytest.raises(ValueError, match="backend='native' needs CPU float32"):
        hidden_loss(torch.randn(2, 3).to(torch.float8_e4m3fn), torch.randn(2, 3), backend="native")
