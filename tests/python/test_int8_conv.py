"""INT8 convolutions: oneDNN's kernel against the reference on odd shapes, the Int8Conv modules
against the float conv, and the W8A8 / Int8Dynamic transform (BatchNorm folding, report,
save / load, bad input). Run also under TENSORSLIM_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2, where
the kernel has no VNNI and the codes are 7-bit."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.ops import conv_int8 as C
from conftest import check_matches_fresh_state, skip_without_onednn

# (N, C, spatial, OC, kernel, stride, padding, dilation, groups)
SHAPES = [
    (2, 8, (9, 11), 16, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 5, (7, 7), 7, (3, 3), (2, 2), (1, 1), (1, 1), 1),  # batch 1, odd channels, stride 2
    (3, 12, (10, 9), 12, (3, 3), (1, 1), (2, 2), (2, 2), 12),  # depthwise, dilation 2
    (2, 12, (8, 8), 18, (3, 1), (1, 2), (1, 0), (1, 1), 3),  # groups, rectangular
    (1, 33, (6, 5), 17, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1 (SqueezeNet)
    (2, 16, (16, 16), 24, (1, 1), (2, 2), (0, 0), (1, 1), 1),  # strided 1x1 shortcut
    (2, 6, (13,), 10, (5,), (2,), (2,), (1,), 2),  # Conv1d
    (1, 9, (20,), 9, (3,), (1,), (2,), (2,), 9),  # Conv1d depthwise, dilation 2
]


def _case(shape, seed, zp):
    n, c, sp, oc, k, stride, pad, dil, groups = shape
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(0, 256, (n, *sp, c), generator=g, dtype=torch.int32).to(torch.uint8)
    qw = torch.randint(-127, 128, (oc, c // groups, *k), generator=g, dtype=torch.int32).to(torch.int8)
    impl = C.impl_name(qx, qw, stride, pad, dil, groups, zp, True)
    if not C.is_exact_8bit(impl):  # no VNNI: the module gives this kernel 7-bit codes only
        qx = qx // 2
        zp = min(zp, 127)
    return qx, qw, zp, impl, (stride, pad, dil, groups)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zp", [0, 131])
def test_kernel_integer_part_is_exact(shape, zp):
    """Unit scales, no bias: the kernel's output is the integer sum itself (|acc| < 2^24)."""
    skip_without_onednn()  # oneDNN's int8 convolution itself
    qx, qw, zp, impl, geo = _case(shape, 1, zp)
    packed = C.pack_weight(qx, qw, *geo, zp, False)
    assert packed is not None, f"oneDNN has no int8 convolution here ({impl!r})"
    ones = torch.ones(qw.shape[0])
    got = C.conv_int8(qx, qw, ones, None, 1.0, zp, *geo, packed=packed)
    ref = C.conv_int8_reference(qx, qw, ones, None, 1.0, zp, *geo)
    assert got.shape == ref.shape
    assert torch.equal(got, ref), f"{impl}: max diff {(got - ref).abs().max()}"


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_rescale_and_bias(shape):
    """Scales and bias fused: the same to a few ulp (oneDNN may order the products differently)."""
    qx, qw, zp, impl, geo = _case(shape, 2, 77)
    g = torch.Generator().manual_seed(3)
    ws, bias = torch.rand(qw.shape[0], generator=g) * 0.01 + 1e-3, torch.randn(qw.shape[0], generator=g)
    packed = C.pack_weight(qx, qw, *geo, zp, True)
    got = C.conv_int8(qx, qw, ws, bias, 0.037, zp, *geo, packed=packed)
    ref = C.conv_int8_reference(qx, qw, ws, bias, 0.037, zp, *geo)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zp, code_max", [(0, 255), (131, 255), (60, 127)])
def test_quantizing_call_equals_its_two_ops(shape, zp, code_max, monkeypatch):
    """The one-call static path (codes in a native scratch buffer) gives exactly what the
    quantize op and the convolution op give, and really runs natively in eager mode."""
    skip_without_onednn()  # oneDNN's int8 convolution itself
    n, c, sp, oc, k, stride, pad, dil, groups = shape
    g = torch.Generator().manual_seed(5)
    xc = torch.randn(n, *sp, c, generator=g) * 3
    qw = torch.randint(-127, 128, (oc, c // groups, *k), generator=g, dtype=torch.int32).to(torch.int8)
    ws, bias = torch.rand(oc, generator=g) * 0.01 + 1e-3, torch.randn(oc, generator=g)
    geo = (stride, pad, dil, groups)
    packed = C.pack_weight(torch.empty(xc.shape, dtype=torch.uint8), qw, *geo, zp, True)
    assert packed is not None
    q = ts.ops.quantize_static(xc.reshape(-1, c), 0.021, zp).clamp_(max=code_max).reshape(xc.shape)
    two_ops = C.conv_int8(q, qw, ws, bias, 0.021, zp, *geo, packed=packed)
    calls = []
    native = C._C.conv_int8_quantizing_run
    monkeypatch.setattr(C._C, "conv_int8_quantizing_run", lambda *a: calls.append(1) or native(*a))
    got = C.conv_int8_quantizing(xc, 0.021, zp, code_max, qw, ws, bias, *geo, packed)
    assert calls, "the eager call did not take the one-call path"
    assert torch.equal(got, two_ops)
    # oneDNN unable to run (e.g. in a forked child): the two ops, the same result
    monkeypatch.setattr(C._C, "conv_int8_quantizing_run", lambda *a: False)
    assert torch.equal(C.conv_int8_quantizing(xc, 0.021, zp, code_max, qw, ws, bias, *geo, packed), two_ops)


def test_quantizing_call_rejects_bad_input():
    skip_without_onednn()  # oneDNN's int8 convolution itself
    qw = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int32).to(torch.int8)
    xc = torch.randn(1, 6, 6, 3)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    packed = C.pack_weight(torch.empty(xc.shape, dtype=torch.uint8), qw, *geo, 0, False)
    ws = torch.ones(4)
    xc[0, 2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        C.conv_int8_quantizing(xc, 0.1, 0, 255, qw, ws, None, *geo, packed)
    with pytest.raises(ValueError, match="code_max"):
        C.conv_int8_quantizing(torch.randn(1, 6, 6, 3), 0.1, 0, 200, qw, ws, None, *geo, packed)
    with pytest.raises(ValueError, match="scale"):
        C.conv_int8_quantizing(torch.randn(1, 6, 6, 3), 0.0, 0, 255, qw, ws, None, *geo, packed)
    with pytest.raises(ValueError, match="w_scales"):
        C.conv_int8_quantizing(torch.randn(1, 6, 6, 3), 0.1, 0, 255, qw, torch.ones(5), None, *geo, packed)


def _float_conv(shape, seed=0, bias=True):
    n, c, sp, oc, k, stride, pad, dil, groups = shape
    torch.manual_seed(seed)
    cls = nn.Conv1d if len(sp) == 1 else nn.Conv2d
    conv = cls(c, oc, k, stride, pad, dil, groups, bias=bias).eval()
    return conv, torch.randn(n, c, *sp)


def _sqnr(ref, got):
    return 20 * math.log10(float(ref.norm()) / max(float((ref - got).norm()), 1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_module_matches_float_conv_and_reference(shape, mode):
    conv, x = _float_conv(shape)
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    cls = ts.nn.Int8Conv1d if len(shape[2]) == 1 else ts.nn.Int8Conv2d
    args = (conv, conv.weight, conv.bias, mode, scale if mode == "static" else None, zp if mode == "static" else 0)
    fast, ref = cls.from_float(*args), cls.from_float(*args, backend="reference")
    with torch.no_grad():
        y, y_fast, y_ref = conv(x), fast(x), ref(x)
    assert y_fast.shape == y.shape and y_fast.dtype == torch.float32
    assert _sqnr(y, y_ref) > 30
    assert _sqnr(y, y_fast) > 24  # 7-bit codes where the kernel has no VNNI
    impl = C.impl_name(torch.empty(x.movedim(1, -1).shape, dtype=torch.uint8), fast.qweight, fast.stride,
                       fast.padding, fast.dilation, fast.groups, 1, True)
    if C.is_exact_8bit(impl):  # same codes as the reference: the same result to rounding
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("shape", [(3, 16, (17, 10), 24, (1, 1), (2, 3), (0, 0), (1, 1), 1),  # odd sizes
                                   (2, 12, (9, 9), 6, (1, 1), (2, 1), (0, 0), (2, 1), 3),  # groups, one axis
                                   (2, 6, (15,), 10, (1,), (4,), (0,), (1,), 2)])  # Conv1d
def test_strided_pointwise_conv_reads_only_the_positions_it_uses(shape, mode, backend):
    """A 1x1 conv without padding and with a stride takes every stride-th position before
    quantizing, then runs at stride 1: the result is the specification's on the full input
    (static: the same codes at the positions read; dynamic: the range of the values read)."""
    conv, x = _float_conv(shape)
    sp, stride = len(shape[2]), shape[5]
    x[(slice(None), slice(None)) + (1,) * sp] = 50.0  # a position no output reads widens the input's range
    pick = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
    read = x[pick]
    lo, hi = min(float(x.min()), 0.0), float(x.max())
    scale, zp = ((hi - lo) / 255, round(-lo * 255 / (hi - lo))) if mode == "static" else (None, 0)
    cls = ts.nn.Int8Conv1d if sp == 1 else ts.nn.Int8Conv2d
    m = cls.from_float(conv, conv.weight, conv.bias, mode, scale, zp, backend=backend)
    assert m._pick is not None and m._run_stride == (1,) * sp
    with torch.no_grad():
        y = m(x)
    assert y.shape == conv(x).shape
    if mode == "dynamic":
        rlo, rhi = min(float(read.min()), 0.0), max(float(read.max()), 0.0)
        scale = (rhi - rlo) / 255
        zp = min(max(round(-rlo / scale), 0), 255)
    xc = x.movedim(1, -1).contiguous()
    codes = ts.ops.quantize_static(xc.reshape(-1, xc.shape[-1]), scale, zp, dtype=torch.uint8).reshape(xc.shape)
    read_codes = codes[(slice(None),) + pick[2:]].contiguous()
    impl = C.impl_name(read_codes, m.qweight, m._run_stride, m.padding, m.dilation, m.groups, zp, True)
    if backend == "auto" and not C.is_exact_8bit(impl):
        return  # 7-bit codes (no VNNI): checked against the float conv by the test above
    ref = C.conv_int8_reference(codes, m.qweight, m.w_scales, m.bias, scale, zp, stride, m.padding, m.dilation,
                                m.groups).movedim(-1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_module_surface_and_packing_cache():
    conv, x = _float_conv(SHAPES[0])
    m = ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, "dynamic")
    for f in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(m, f) == getattr(conv, f), f
    w = m.weight
    assert w.shape == conv.weight.shape and w.dtype == torch.float32
    assert float((w - conv.weight.detach()).abs().max()) <= float(m.w_scales.max()) / 2 + 1e-7
    with pytest.raises(AttributeError):
        m.weight = torch.zeros_like(w)
    m(x)
    packed = dict(m._kernels)
    m(x)  # same shape: the packed weights are reused, not redone
    assert all(m._kernels[k][0] is v[0] for k, v in packed.items())
    m(x[:1])  # another shape gets its own
    assert len(m._kernels) == len(packed) + 1
    assert m(x[0]).shape == conv(x[0]).shape  # unbatched input
    y = m(x)
    m.to(torch.bfloat16)  # the compute dtype changes, the packed form and fp32 scales stay
    assert m.w_scales.dtype == torch.float32 and m.qweight.dtype == torch.int8
    yb = m(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and _sqnr(y, yb.float()) > 30


def test_static_call_plan_follows_the_module_tensors(monkeypatch):
    """Static eager calls reuse their cached arguments only while the module's tensors are
    unchanged: new calibration, new weights or a new bias are used at the next call (the
    reference: a module that never ran, holding the same state; same kernel, same bits)."""
    skip_without_onednn()  # oneDNN's int8 convolution itself
    conv, x = _float_conv(SHAPES[0])
    lo, hi = float(x.min()), float(x.max())
    make = lambda: ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, "static", (hi - lo) / 255,
                                               round(-lo * 255 / (hi - lo)))
    m = make()
    calls = []
    native = ts.nn.int8_conv._C.conv_int8_quantizing_run
    monkeypatch.setattr(ts.nn.int8_conv._C, "conv_int8_quantizing_run", lambda *a: calls.append(1) or native(*a))
    seen = []

    def check():
        check_matches_fresh_state(m, make, x, seen)

    check()
    with torch.no_grad():
        assert torch.equal(m(x), seen[0])
        assert len(m._plans) == 1
        m.act_scale.mul_(1.5)
        m.act_zero_point.fill_(40)
        check()  # in-place recalibration
        m.load_state_dict(make().state_dict())
        m.qweight.neg_()
        check()  # weights changed in place
        m.bias = torch.randn(m.out_channels)
        check()  # a bias set anew
    assert len(calls) == 9  # every call above took the one-call path (fresh modules too)
    with torch.inference_mode():  # inference tensors carry no version counter: still right
        m2 = make()
        y2 = m2(x)
        assert torch.equal(y2, m2(x)) and torch.equal(y2, seen[0])


def test_checked_calls_still_check_what_can_change(monkeypatch):
    """A call whose input signature (shapes, strides, dtypes, activation) passed forward's
    checks before skips them (_checked_call), but not what may differ between such calls:
    values (NaN), gradient recording, the backend, a residual of another shape; other
    signatures still get every check."""
    skip_without_onednn()  # oneDNN's int8 convolution itself
    conv, x = _float_conv(SHAPES[0])
    m = ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, "static", 0.05, 128)
    res = torch.randn(m(x).shape)
    with torch.no_grad():
        y, yr = m(x), m(x, residual=res, activation="relu")
        assert len(m._checked) == 2
        assert torch.equal(m(x), y) and torch.equal(m(x, residual=res, activation="relu"), yr)
        torch.testing.assert_close(yr, (y + res).relu(), rtol=1e-6, atol=1e-6)  # fused in the kernel
        bad = x.clone()
        bad[0, 1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            m(bad)
        with pytest.raises(ValueError, match="expected 8 input channels, got 3"):
            m(torch.randn(2, 3, 9, 11))
        other = torch.randn(1, *res.shape[1:])  # broadcasts: not fusable, the torch epilogue
        assert torch.equal(m(x, residual=other, activation="relu"), (y + other).relu())
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()  # through the autograd function, not the checked call
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    calls = []
    native = ts.nn.int8_conv._C.conv_int8_quantizing_run
    monkeypatch.setattr(ts.nn.int8_conv._C, "conv_int8_quantizing_run", lambda *a: calls.append(1) or native(*a))
    m.backend = "reference"
    ref = ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, "static", 0.05, 128, backend="reference")
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))  # the reference path, not the kernel
    assert not calls


def test_backward_reaches_the_input():
    conv, x = _float_conv(SHAPES[1])
    m = ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, "dynamic")
    x.requires_grad_(True)
    m(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.conv2d(xr, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups).square().sum().backward()
    assert _sqnr(xr.grad, x.grad) > 25


def test_bad_inputs_are_clear_errors():
    conv, x = _float_conv(SHAPES[0])
    m = ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, "static", 0.05, 128)
    with pytest.raises(TypeError, match="float input"):
        m(x.to(torch.int32))
    with pytest.raises(ValueError, match="expected 8 input channels, got 3"):
        m(torch.randn(2, 3, 9, 11))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(9, 11))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([1.0])
    bad = x.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(bad)
    dyn = ts.nn.Int8Conv2d.from_float(conv, conv.weight, conv.bias, "dynamic")
    with pytest.raises(ValueError, match="NaN"):
        dyn(bad)


class _Residual(nn.Module):
    """conv -> bn, where the conv's output is also added back: its BatchNorm must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(torch.relu(self.bn(y) + y)))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def test_fold_only_where_the_conv_output_has_one_reader():
    model = _randomize_bn(_Residual()).eval()
    x = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    with torch.no_grad():
        ref = model(x[0])
    report = ts.quantize(model, ts.W8A8(), calib_data=x, progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["bn2"].action == "folded" and "conv2" in rows["bn2"].reason
    assert rows["bn"].action == "skipped" and "also read elsewhere" in rows["bn"].reason
    assert isinstance(model.bn2, ts.nn.FoldedBatchNorm) and isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert _sqnr(ref, model(x[0])) > 25


def test_int8_dynamic_with_data_folds_batchnorm():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    report = ts.quantize(model, ts.Int8Dynamic(), calib_data=[x], progress=False)
    assert [(c.name, c.action) for c in report.changes] == [("0", "quantized"), ("1", "folded")]
    with torch.no_grad():
        assert _sqnr(ref, model(x)) > 25


def test_training_mode_and_padding_mode_are_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4))
    report = ts.quantize(model, ts.W8A8(), calib_data=[torch.randn(2, 3, 8, 8)], progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["0"].action == "skipped" and "padding_mode='reflect'" in rows["0"].reason
    assert rows["1"].action == "quantized"
    assert rows["2"].action == "skipped" and "model.eval()" in rows["2"].reason
    assert len(report.changes) == 3  # no duplicate rows from the linear pass


def test_int8_dynamic_without_data_and_conv1d():
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=8),
                          nn.Flatten(), nn.Linear(8 * 14, 5)).eval()
    x = torch.randn(4, 3, 16)
    with torch.no_grad():
        ref = model(x)
    report = ts.quantize(model, ts.Int8Dynamic(), progress=False)
    assert [c.action for c in report.changes] == ["quantized"] * 3
    again = ts.quantize(model, ts.Int8Dynamic(), progress=False)  # already compressed: said so
    assert all(c.action == "skipped" and "already compressed" in c.reason for c in again.changes)
    assert isinstance(model[0], ts.nn.Int8Conv1d) and isinstance(model[4], ts.nn.Int8Linear)
    with torch.no_grad():
        assert _sqnr(ref, model(x)) > 25


@pytest.fixture(scope="module")
def digits():
    from tensorslim.eval import digits_basic_resnet as D

    xtr, ytr, xte, yte = D.digits_images()
    torch.manual_seed(0)
    model = D.train(D.DigitsResNet(width=16, size=8), xtr, ytr, epochs=4)
    return D, model, xtr, xte, yte


def test_digits_resnet_w8a8_accuracy_fold_summary_and_save_load(digits, tmp_path):
    D, model, xtr, xte, yte = digits
    base = D.accuracy(model, xte, yte)
    q = D.DigitsResNet(width=16, size=8)
    q.load_state_dict(model.state_dict())
    q.eval()
    report = ts.quantize(q, ts.W8A8(), calib_data=list(xtr[:256].split(64)), progress=False)
    kinds = [c.module_type for c in report.changed]
    assert kinds.count("Conv2d") == 9 and kinds.count("BatchNorm2d") == 9, str(report)
    assert [c.name for c in report.skipped] == ["head"]  # skip_output_head
    acc = D.accuracy(q, xte, yte)
    assert acc >= base - 0.01, (base, acc)
    text = str(ts.summary(q))
    assert "folded into layer1.conv1" in text and "w8a8 u8" in text
    path = tmp_path / "resnet.slim.safetensors"
    ts.save(q, path)
    fresh = ts.load(D.DigitsResNet(width=16, size=8).eval(), path)
    assert isinstance(fresh.layer1.bn1, ts.nn.FoldedBatchNorm)
    with torch.no_grad():
        assert torch.equal(fresh(xte[:32]), q(xte[:32]))


def test_built_and_run_under_inference_mode():
    conv, x = _float_conv(SHAPES[4])
    with torch.inference_mode():
        model = nn.Sequential(conv)
        ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=[x], progress=False)
        assert _sqnr(conv.weight.new_tensor(0) + F.conv2d(x, conv.weight, conv.bias), model(x)) > 25


def test_nan_calibration_names_the_layer_and_leaves_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0'.*NaN"):
        ts.quantize(model, ts.W8A8(), calib_data=[bad], progress=False)
    assert type(model[0]) is nn.Conv2d


def test_same_padding_odd_kernel_runs_even_kernel_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(4, 4, 2, padding="same")).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    report = ts.quantize(model, ts.Int8Dynamic(), progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["0"].action == "quantized" and model[0].padding == (1, 1)
    assert rows["1"].action == "skipped" and "even kernel" in rows["1"].reason
    with torch.no_grad():
        assert _sqnr(ref, model(x)) > 25


def test_batchnorm_after_an_in_place_relu_is_not_folded_into_the_conv():
    """bn(F.relu(conv(x), inplace=True)): the ReLU returns the conv's own output tensor, changed
    in place, so the BatchNorm does not read the conv's output as the conv made it. Folded, the
    model computed relu(bn(conv(x))), unnoticed on a calibration batch the ReLU leaves alone."""
    class ReluThenBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            with torch.no_grad():
                self.conv.weight.abs_()
                self.conv.bias.fill_(5.0)
                self.bn.bias.fill_(1.0)

        def forward(self, x):
            return self.bn(F.relu(self.conv(x), inplace=True))

    torch.manual_seed(0)
    model = ReluThenBn().eval()
    ref = copy.deepcopy(model)
    ts.quantize(model, ts.Int8Dynamic(), calib_data=[torch.rand(2, 4, 6, 6) * 0.1], progress=False)
    assert isinstance(model.bn, nn.BatchNorm2d)  # kept
    x = -10 * torch.rand(2, 4, 6, 6)  # conv outputs below 0: the ReLU matters
    with torch.no_grad():
        assert float((model(x) - ref(x)).abs().max()) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_cnn_with_batchnorm_quantizes_with_calibration(dtype):
    """The fold's trial conv takes the model's dtype (it raised 'Input type BFloat16 and bias
    type float'), and a half model's fold matches to its own precision, so it folds as fp32 does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    model = model.to(dtype)
    x = torch.randn(2, 8, 10, 10).to(dtype)
    with torch.no_grad():
        ref = model(x).float()
    report = ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=[x], progress=False)
    assert any(c.name == "1" and c.reason == "folded into 0" for c in report.changes), report
    with torch.no_grad():
        y = model(x)
    assert y.dtype == dtype and float((y.float() - ref).norm() / ref.norm()) < 0.03


def test_kernel_reads_strided_scales_and_bias_and_refuses_other_packings():
    """oneDNN reads w_scales / bias / packed through their data pointers: strided or expanded
    ones were read as if dense (wrong outputs; an expanded w_scales read past its storage)."""
    skip_without_onednn()  # oneDNN's int8 convolution itself
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(0, 128, (1, 8, 8, 3), generator=g, dtype=torch.uint8)  # 7-bit: exact without VNNI too
    qw = torch.randint(-127, 128, (4, 3, 3, 3), generator=g).to(torch.int8)
    ws, bias = torch.rand(4, generator=g) * 0.01 + 0.001, torch.randn(4, generator=g)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    packed = C.pack_weight(qx, qw, *geo, 3, True)
    want = C.conv_int8_reference(qx, qw, ws, bias, 0.05, 3, *geo)
    strided = lambda t: torch.stack([t, torch.zeros_like(t)], 1)[:, 0]  # noqa: E731
    for s, b in ((strided(ws), bias), (ws, strided(bias)), (torch.tensor([0.004]).expand(4), bias)):
        ref = C.conv_int8_reference(qx, qw, s, b, 0.05, 3, *geo)
        torch.testing.assert_close(C.conv_int8(qx, qw, s, b, 0.05, 3, *geo, packed), ref, rtol=1e-5, atol=1e-4)
        xc = (qx.float() - 3) * 0.05
        torch.testing.assert_close(C.conv_int8_quantizing(xc, 0.05, 3, 127, qw, s, b, *geo, packed), ref,
                                   rtol=1e-5, atol=1e-4)
    assert torch.allclose(C.conv_int8(qx, qw, ws, bias, 0.05, 3, *geo, packed), want, atol=1e-4)
    with pytest.raises(TypeError, match="packed: expected dtype uint8"):
        C.conv_int8(qx, qw, ws, bias, 0.05, 3, *geo, packed.view(torch.int8))
    with pytest.raises(ValueError, match="stride and dilation must be ints >= 1"):  # ZeroDivisionError before
        C.conv_int8(qx, qw, ws, bias, 0.05, 3, [0, 0], [1, 1], [1, 1], 1, packed)


def test_fake_tensors_and_tracers_take_the_op():
    """FakeTensorMode reached oneDNN with fake data pointers (the interpreter crashed); make_fx
    and jit.trace recorded an uninitialized output or packed buffer in place of the conv."""
    skip_without_onednn()  # oneDNN's int8 convolution itself
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    qx = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    qw = torch.randint(-127, 128, (4, 3, 3, 3)).to(torch.int8)
    ws = torch.full((4,), 0.01)
    packed = C.pack_weight(qx, qw, [1, 1], [1, 1], [1, 1], 1, 3, False)
    with FakeTensorMode() as mode:
        f = mode.from_tensor
        assert C.conv_int8(f(qx), f(qw), f(ws), None, 0.05, 3, [1, 1], [1, 1], [1, 1], 1, f(packed)).shape == (1, 8, 8, 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()
    ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=[torch.randn(2, 3, 8, 8)], progress=False)
    x, x2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(model), (x,), check_trace=False)  # packs inside the trace
        graph = make_fx(copy.deepcopy(model))(x)
        assert "tensorslim.conv_int8.default" in [str(n.target) for n in graph.graph.nodes]
        for run in (traced, graph):
            assert torch.equal(run(x2), model(x2))


def test_errors_name_the_conv_in_its_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    ts.quantize(model, ts.Int8Dynamic(skip_output_head=False), progress=False)
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        model(torch.full((1, 3, 8, 8), float("nan")))
    assert "in layer '0' (Int8Conv2d)" in info.value.__notes__


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_round_trip_keeps_the_fp32_scales_and_bias(dtype):
    """.half() / .to(bf16) rounded w_scales, bias and act_scale through the half dtype before
    casting them back to fp32 (0.006-0.01 off the model after .float())."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    data = [torch.randn(2, 3, 10, 10) for _ in range(2)]
    ts.quantize(model, ts.W8A8(), calib_data=data, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(data[0])
    model.to(dtype)
    assert all(torch.equal(model.state_dict()[k], v) and model.state_dict()[k].dtype == v.dtype
               for k, v in before.items())
    assert model(data[0].to(dtype)).dtype == dtype
    assert torch.equal(model.float()(data[0]), ref)


def test_double_is_a_type_error_as_for_the_linears():
    """.double() passed silently (the next forward then refused the float64 input)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    with pytest.raises(TypeError, match="Int8Conv2d: cannot compute in torch.float64"):
        model[0].double()
    with pytest.raises(TypeError, match=r"expected a float input \(float32, bfloat16 or float16\)"):
        model(torch.randn(1, 3, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_reads_the_conv_weight_dtype_for_its_input(dtype):
    """ViT / CLIP cast the pixels to the patch conv's `weight.dtype`; after model.half() it said
    float32, the conv returned float32 and the half LayerNorm after it raised."""
    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = nn.Conv2d(3, 16, 4, stride=4), nn.LayerNorm(16)

        def forward(self, px):
            x = self.proj(px.to(self.proj.weight.dtype))
            return self.norm(x.flatten(2).transpose(1, 2))

    torch.manual_seed(0)
    model = Patches().eval()
    px = torch.randn(2, 3, 16, 16)
    want = model(px)
    ts.quantize(model, ts.Int8Dynamic(), calib_data=[px], progress=False)
    model.to(dtype)
    assert model.proj.weight.dtype == dtype
    with torch.no_grad():
        got = model(px)
    assert got.dtype == dtype and (got.float() - want).abs().max() < 0.1 * want.abs().max()
    model.float()
    assert model.proj.weight.dtype == torch.float32 and model(px).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_code_calling_f_conv1d_with_the_conv_bias(dtype):
    """Mamba's slow path computes F.conv1d(x, conv1d.weight, conv1d.bias) itself; after
    model.half() the INT8 conv's bias stayed float32 ("Input type Half and bias type float")."""
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 8, 4, groups=8, padding=3)
    model = nn.Sequential(conv)
    x = torch.randn(2, 8, 12)
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    stored = model[0].bias.clone()
    model.to(dtype)
    q = model[0]
    assert q.bias.dtype == dtype
    got = F.conv1d(x.to(dtype), q.weight, q.bias, padding=3, groups=8)
    want = F.conv1d(x, q.float().weight, stored, padding=3, groups=8)
    assert got.dtype == dtype and float((got.float() - want).norm() / want.norm()) < 2e-2
    assert torch.equal(q.bias, stored)  # back to float32: the stored bias was never rounded


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_quantized_after_model_half_computes_in_that_dtype(dtype):
    """Compressed after model.half(), an INT8 conv kept float32 `.weight` / `.bias` while the
    linears took the half dtype (ViT / CLIP cast pixels to the patch conv's weight dtype and
    failed; Mamba's loaded model differed from the quantized one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(32, 8)).to(dtype)
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    conv = model[0]
    assert conv.weight.dtype == dtype and conv.bias.dtype == dtype and conv.compute_dtype == dtype
    assert model(torch.randn(2, 4, 8, dtype=dtype)).dtype == dtype
