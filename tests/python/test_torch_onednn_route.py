"""Int8Conv2d's route through the oneDNN torch ships (ops/torch_onednn.py): it gives our own
kernel's results and the reference's, is taken only for calls large enough to gain and whose
epilogue torch's op has, never changes a residual it reads, and a module that used it can
still be copied, pickled and updated in place. Run also under the AVX2 caps (7-bit codes)."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.ops import torch_onednn as CT
from tensorslim.ops import int8 as int8_ops

pytestmark = pytest.mark.skipif(not CT.available(), reason="this torch has no oneDNN int8 convolution ops")

# (N, C, H, W, OC, kernel, stride, padding, groups): each large enough for the route to pay
SHAPES = [
    (8, 32, 16, 16, 48, 3, 1, 1, 1),
    (32, 32, 16, 15, 64, 3, 2, 1, 1),  # strided, odd width
    (32, 32, 16, 16, 64, 1, 2, 0, 1),  # strided 1x1 shortcut (by output size)
    (8, 64, 32, 32, 64, 3, 1, 1, 64),  # depthwise
    (64, 1, 16, 16, 32, 3, 1, 1, 1),  # 1-channel stem (by output size)
]
EPILOGUES = [(False, ""), (False, "relu"), (False, "relu6"), (False, "silu"), (True, ""), (True, "relu")]


@pytest.fixture(autouse=True)
def linear_route_eligible(monkeypatch):
    """Linears take this route only where our panels are not packed (AVX2-VNNI and AMX CPUs;
    test_w8a8.py checks that our VNNI and AVX2 panels replace it elsewhere): these tests
    exercise it on any CPU whose torch matmul is exact, as those CPUs run it."""
    monkeypatch.setattr(CT, "packs_own_panels", lambda K, N: False)


@pytest.fixture
def routes():
    """Runs a callable with torch's route on, then off; restores the setting."""
    previous = CT.set_enabled(True)

    def both(fn):
        CT.set_enabled(True)
        on = fn()
        CT.set_enabled(False)
        off = fn()
        CT.set_enabled(True)
        return on, off

    yield both
    CT.set_enabled(previous)


def _counter(monkeypatch, name):
    calls = []
    real = getattr(CT, name)
    monkeypatch.setattr(CT, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def taken(monkeypatch):
    """Counts the conv calls that took torch's route."""
    return _counter(monkeypatch, "conv2d_quantizing")


@pytest.fixture
def linear_taken(monkeypatch):
    """Counts the linear calls that took torch's route."""
    return _counter(monkeypatch, "linear_w8a8")


def _module(shape, mode, seed=0, backend="auto"):
    n, c, h, w, oc, k, s, p, g = shape
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, oc, k, s, p, groups=g).eval()
    x = (4 * torch.randn(n, c, h, w)).contiguous(memory_format=torch.channels_last)  # outputs past ReLU6's 6
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 255
    static = mode == "static"
    mod = ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, mode, scale if static else None,
                                      round(-lo / scale) if static else 0, backend=backend)
    return mod, x


def _residual(mod, x, seed=1):
    with torch.no_grad():
        shape = mod(x).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last)


def _close(got, ref):
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _matches_reference(mod, got, ref):
    """The reference's result to rounding, or, where the kernel takes 7-bit codes (no VNNI; the
    reference keeps 8), within what one bit less allows."""
    if any(seven_bit for _, seven_bit in mod._kernels.values()):
        assert 20 * math.log10(float(ref.norm()) / float((ref - got).norm())) > 30
    else:
        _close(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("with_residual, activation", EPILOGUES)
def test_route_matches_our_kernel_and_the_reference(shape, mode, with_residual, activation, routes, taken):
    mod, x = _module(shape, mode)
    ref_mod, _ = _module(shape, mode, backend="reference")
    residual = _residual(mod, x) if with_residual else None
    kept = None if residual is None else residual.clone()
    taken.clear()
    with torch.no_grad():
        on, off = routes(lambda: mod(x, residual, activation))
        ref = ref_mod(x, residual, activation)
    assert len(taken) == 1, "torch's route was not taken"
    assert on.shape == ref.shape and on.dtype == torch.float32
    _close(on, off)
    _matches_reference(mod, on, ref)
    if residual is not None:
        assert torch.equal(residual, kept), "the residual was changed"


def test_small_convs_take_the_route_from_batch_8(routes, taken):
    """A conv far below the size thresholds stays on our call up to batch 7 and takes torch's
    route from _MIN_BATCH (in a model, one conv left on our call among convs on torch's
    threads costs more than the route), with the same results."""
    mod, x = _module((8, 8, 6, 6, 8, 3, 1, 1, 1), "static")
    assert 8 * 36 * 8 * 72 < CT._MIN_MACS and 8 * 36 * 8 < CT._MIN_OUTPUTS and CT._MIN_BATCH == 8
    with torch.no_grad():
        for n, expect in [(7, 0), (8, 1)]:
            taken.clear()
            on, off = routes(lambda: mod(x[:n]))
            assert len(taken) == expect
            _close(on, off)


def test_route_keeps_nan_and_inf_of_a_residual_as_the_reference(taken):
    """The residual is added after torch's conv, in fp32 as the reference adds it: NaN and Inf
    in a residual come through the add and the ReLU where the reference's do (torch's ReLU
    post-op made a NaN sum 0), and every other output matches."""
    mod, x = _module(SHAPES[0], "static")
    ref_mod, _ = _module(SHAPES[0], "static", backend="reference")
    r = _residual(mod, x)
    r[0, 0, 0, 0], r[0, 1, 2, 3], r[1, 2, 3, 4] = float("nan"), float("inf"), -float("inf")
    taken.clear()
    with torch.no_grad():
        for activation in ("", "relu"):
            got, ref = mod(x, r, activation), ref_mod(x, r, activation)
            for special in (torch.isnan, torch.isposinf, torch.isneginf):
                assert torch.equal(special(got), special(ref)), (activation, special.__name__)
            assert int(ref.isnan().sum()) == 1 and int(ref.isposinf().sum()) == 1
            finite = ref.isfinite()
            _matches_reference(mod, got[finite], ref[finite])
    assert len(taken) == 2, "torch's route was not taken"


def test_not_taken_where_it_does_not_pay_or_cannot(routes, taken):
    """Small calls, epilogues torch's op lacks, Conv1d and the switch take our kernel (with the
    same results as the reference); a call recording a gradient still gets one to its input."""
    big, x = _module(SHAPES[0], "static")
    ref, _ = _module(SHAPES[0], "static", backend="reference")
    r = _residual(big, x)
    taken.clear()
    with torch.no_grad():
        for args in [(x[:1],), (x, None, "gelu"), (x, r, "silu"), (x, r, "relu6")]:
            on, off = routes(lambda: big(*args))
            assert torch.equal(on, off)
            _matches_reference(big, on, ref(*args))
    assert not taken
    xg = x.clone().requires_grad_()
    y = big(xg)  # the frozen layer's autograd function: the forward may take the route
    y.sum().backward()
    with torch.no_grad():
        _close(y.detach(), big(x))
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    taken.clear()
    conv1d = nn.Conv1d(64, 64, 3, padding=1).eval()
    m1 = ts.nn.Int8Conv1d.from_float(conv1d, conv1d.weight, conv1d.bias, "dynamic")
    with torch.no_grad():
        m1(torch.randn(64, 64, 128))
    assert not taken
    CT.set_enabled(False)
    with torch.no_grad():
        big(x)
    assert not taken


def test_module_copies_and_updates_after_the_route(routes, taken):
    """The route keeps torch's packed weights (opaque tensors) in the module: copies and pickles
    start without them, weights or scales changed in place are used at the next call, and NaN
    input is the quantizer's clear error."""
    mod, x = _module(SHAPES[0], "static")
    with torch.no_grad():
        y = mod(x)
        assert taken
        twin = copy.deepcopy(mod)
        buf = io.BytesIO()
        torch.save(mod, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(twin(x), y) and torch.equal(loaded(x), y)
        fresh, _ = _module(SHAPES[0], "static")
        mod.qweight.neg_()
        mod.w_scales.mul_(1.5)
        fresh.load_state_dict(mod.state_dict())
        y2 = mod(x)
        assert not torch.equal(y2, y)
        on, off = routes(lambda: fresh(x))
        _close(y2, off)
        _close(y2, on)
        bad = x.clone()
        bad[3, 4, 5, 6] = float("nan")
        taken.clear()
        with pytest.raises(ValueError, match="finite"):
            mod(bad)
        assert taken


def test_resnet_block_model_same_result_both_routes(routes, taken, monkeypatch):
    """A W8A8 model with fused ReLU / residual epilogues at batch 32 gives the same logits with
    the route on and off, and the route runs: the stem alone, each block's two convs as a
    chain (conv1 hands conv2 its codes, nn/int8_conv_chain.py)."""

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), Block(32), Block(32), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(32, 3, 16, 16)
    ts.quantize(model, ts.W8A8(), calib_data=[x], progress=False)
    handed = _counter(monkeypatch, "conv2d_to_codes")
    taken.clear()
    with torch.inference_mode():
        on, off = routes(lambda: model(x))
    assert len(taken) == 1 and len(handed) == 2
    _close(on, off)


def _linear(mode, K=384, N=512, bias=True, smooth=False, seed=0, backend="auto"):
    torch.manual_seed(seed)
    inv = torch.rand(K) + 0.5 if smooth else None
    return ts.Int8Linear.from_float(torch.randn(N, K), torch.randn(N) if bias else None, mode, inv,
                                    0.05 if mode == "static" else None, 100 if mode == "static" else 0,
                                    backend=backend)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("bias, smooth", [(True, False), (False, True)])
@pytest.mark.parametrize("shape", [(48,), (3, 37), (512,)])  # rows: 48 (too few MACs), 111 (3-D), 512
def test_linear_route_matches_our_kernels_and_the_reference(mode, bias, smooth, shape, routes, linear_taken):
    mod = _linear(mode, bias=bias, smooth=smooth)
    ref_mod = _linear(mode, bias=bias, smooth=smooth, backend="reference")
    x = 3 * torch.randn(*shape, 384)
    with torch.no_grad():
        on, off = routes(lambda: mod(x))
        ref = ref_mod(x)
    if not CT.linear_pays(x.numel() // 384, 384, 512):  # no exact oneDNN kernel (no VNNI): ours only
        assert not linear_taken and torch.equal(on, off)
        return
    assert len(linear_taken) == 1
    assert on.shape == (*shape, 512) and on.dtype == torch.float32
    _close(on, off)
    _close(on, ref)


def test_narrow_weight_codes_follow_the_spec():
    """weight_qmax: scale = max|row| / qmax (1.0 for a zero row), codes rne(w / scale) within
    +-qmax; 127 is the int8 format's quantizer as before; NaN weights are a clear error."""
    torch.manual_seed(0)
    w = torch.randn(48, 100)
    w[3] = 0
    m = ts.Int8Linear.from_float(w, None, "dynamic", weight_qmax=64)
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 64, torch.ones_like(amax))
    assert torch.equal(m.w_scales, scales)
    assert torch.equal(m.qweight, torch.round(w / scales[:, None]).clamp(-64, 64).to(torch.int8))
    assert int(m.qweight.abs().max()) == 64 and not m.qweight[3].any()
    full = ts.Int8Linear.from_float(w, None, "dynamic")
    assert int(full.qweight.abs().max()) == 127

    def sqnr(mod):
        return 20 * math.log10(float(w.norm()) / float((mod.dequantized_weight() - w).norm()))

    assert 5 < sqnr(full) - sqnr(m) < 7  # one bit less: ~6 dB
    bad = w.clone()
    bad[5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ts.Int8Linear.from_float(bad, None, "dynamic", weight_qmax=64)
    for qmax in (0, 128, 64.0, True):  # a zero bound gave infinite scales and all-zero codes
        with pytest.raises(ValueError, match="weight_qmax must be an int in"):
            ts.Int8Linear.from_float(w, None, "dynamic", weight_qmax=qmax)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_narrow_weights_take_torchs_matmul_and_stay_exact(mode, routes, linear_taken):
    """Codes in [-64, 64] take torch's matmul where it is exact (VNNI / AMX), as full-range ones
    do, with our kernels' and the reference's results; under the AVX2 caps (its kernels add u8 x
    s8 products pairwise in saturating int16) they never reach it: ours run them."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(384, 512))
    x = 3 * torch.randn(256, 384)
    cfg = ts.W8A8(smoothquant=False, weight_qmax=64) if mode == "static" else ts.Int8Dynamic(weight_qmax=64)
    ts.quantize(model, cfg, calib_data=[x] if mode == "static" else None, progress=False)
    mod = model[0]
    ref_mod = copy.deepcopy(mod)
    ref_mod.backend = "reference"
    linear_taken.clear()
    with torch.no_grad():
        on, off = routes(lambda: mod(x))
        ref = ref_mod(x)
    assert len(linear_taken) == (1 if CT._matmul_exact(384, 512) else 0)
    _close(on, off)
    _close(on, ref)


def test_full_range_weights_stay_off_inexact_kernels(routes, linear_taken):
    """Without VNNI (the AVX2 caps) a weight with codes beyond +-64 never reaches torch's matmul."""
    if CT._matmul_exact(384, 512):
        pytest.skip("this CPU's oneDNN matmul is exact for every int8 weight (VNNI / AMX)")
    mod = _linear("dynamic")
    x = 3 * torch.randn(256, 384)
    linear_taken.clear()
    with torch.no_grad():
        on, off = routes(lambda: mod(x))
    assert not linear_taken and torch.equal(on, off)


def test_linear_route_not_taken_where_ours_run(routes, linear_taken):
    """Below LINEAR_MIN_ROWS rows (and _MIN_MACS), for signed (int8) codes and the reference backend, the
    product stays with our kernels."""
    mod = _linear("dynamic")
    x = torch.randn(CT.LINEAR_MIN_ROWS - 1, 384)
    with torch.no_grad():
        on, off = routes(lambda: mod(x))
        assert torch.equal(on, off)
        signed = ts.Int8Linear.from_float(torch.randn(512, 384), None, "static", None, 0.05, 0, act_signed=True)
        signed(torch.randn(256, 384))
        _linear("dynamic", backend="reference")(torch.randn(256, 384))
    assert not linear_taken


def test_linear_route_copies_updates_and_bad_input(linear_taken):
    """Copies and pickles of a layer that used the route work; weights changed in place are
    repacked; NaN input is the quantizer's clear error."""
    mod = _linear("static")
    x = torch.randn(128, 384)
    with torch.no_grad():
        y = mod(x)
        if not linear_taken:
            pytest.skip("no exact oneDNN INT8 matmul on this CPU: the route never runs")
        twin = copy.deepcopy(mod)
        buf = io.BytesIO()
        torch.save(mod, buf)
        buf.seek(0)
        assert torch.equal(twin(x), y) and torch.equal(torch.load(buf, weights_only=False)(x), y)
        mod.qweight.neg_()
        ref = int8_ops.linear_w8a8(x, mod.qweight, mod.w_scales, mod.bias, None, 0.05, 100, backend="reference")
        _close(mod(x), ref)
        bad = x.clone()
        bad[5, 7] = float("nan")
        with pytest.raises(ValueError, match="finite"):
            mod(bad)


def test_route_off_where_torchs_ops_misbehave(monkeypatch):
    """A torch whose private ops fail or compute something else (changed signature or meaning)
    fails the one-time probe: the route stays off and layers run our kernels."""
    assert CT._probe()  # this torch's ops compute what the route expects
    monkeypatch.setattr(CT, "_ops_present", None)
    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", lambda *a: torch.zeros(2, 4), raising=False)
    assert not CT.available()
    monkeypatch.setattr(CT, "_ops_present", None)

    def broken(*a):
        raise RuntimeError("unexpected arguments")

    monkeypatch.setattr(torch.ops.onednn, "qconv_prepack", broken, raising=False)
    assert not CT.available()
    mod, x = _module(SHAPES[0], "static")
    ref, _ = _module(SHAPES[0], "static", backend="reference")
    with torch.no_grad():
        _matches_reference(mod, mod(x), ref(x))
    monkeypatch.setattr(CT, "_ops_present", None)  # probed again after the test


def test_compiled_layers_run_our_ops_and_never_probe(monkeypatch):
    """Under torch.compile the layers go through our custom ops (the route is eager-only) and
    the one-time probe does not run while tracing; the result matches the eager route's."""
    monkeypatch.setattr(CT, "_ops_present", None)
    lin = _linear("dynamic")
    x = torch.randn(128, 384)
    compiled = torch.compile(lambda t: lin(t), backend="eager", fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
        assert CT._ops_present is None
        _close(y, lin(x))


def test_large_weights_take_the_route_from_fewer_rows(monkeypatch, routes, linear_taken):
    """A weight of LARGE_WEIGHT values takes torch's matmul from LARGE_WEIGHT_MIN_ROWS rows (the
    thresholds lowered here so a small layer stands in for a 4096 x 4096 one)."""
    monkeypatch.setattr(CT, "LARGE_WEIGHT", 384 * 512)
    monkeypatch.setattr(CT, "_MIN_MACS", 1)
    mod = _linear("dynamic")
    ref = _linear("dynamic", backend="reference")
    with torch.no_grad():
        few = torch.randn(CT.LARGE_WEIGHT_MIN_ROWS - 1, 384)
        on, off = routes(lambda: mod(few))
        assert not linear_taken and torch.equal(on, off)
        x = torch.randn(CT.LARGE_WEIGHT_MIN_ROWS, 384)
        on, off = routes(lambda: mod(x))
        if CT.linear_pays(len(x), 384, 512):
            assert len(linear_taken) == 1
        _close(on, off)
        _close(on, ref(x))
