"""Conv epilogues (residual add, then ReLU / ReLU6 / SiLU / GELU) run inside the int8 convolution: the kernel against the
reference, the module's fused call against the same ops done one after another, and the graph
pass that rewrites a model's forward (quantization/conv_epilogue.py): which patterns it fuses,
which it must leave alone, and that the model still computes the same thing (copies, pickles,
ts.save / ts.load). Run also under the AVX2 caps (7-bit codes, other oneDNN kernels)."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim._native import _C
from tensorslim import _views
from tensorslim.ops import conv_int8 as C
from tensorslim.quantization.conv_epilogue import FusedForward, fuse_conv_epilogues
from conftest import skip_without_onednn

# (N, C, spatial, OC, kernel, stride, padding, groups)
SHAPES = [
    (2, 8, (9, 11), 16, (3, 3), (1, 1), (1, 1), 1),
    (1, 5, (7, 7), 7, (3, 3), (2, 2), (1, 1), 1),
    (3, 12, (10, 9), 12, (3, 3), (1, 1), (1, 1), 12),  # depthwise
    (2, 16, (16, 16), 24, (1, 1), (2, 2), (0, 0), 1),  # strided 1x1 shortcut
    (2, 6, (13,), 10, (5,), (2,), (2,), 2),  # Conv1d
]


def _kernel_case(shape, seed=0):
    n, c, sp, oc, k, stride, pad, groups = shape
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(0, 128, (n, *sp, c), generator=g, dtype=torch.int32).to(torch.uint8)  # exact on every ISA
    qw = torch.randint(-127, 128, (oc, c // groups, *k), generator=g, dtype=torch.int32).to(torch.int8)
    ws = torch.rand(oc, generator=g) * 0.01 + 1e-3
    bias = torch.randn(oc, generator=g)
    geo = (list(stride), list(pad), [1] * len(sp), groups)
    out_sp = C.out_size(sp, k, stride, pad, [1] * len(sp))
    residual = torch.randn(n, *out_sp, oc, generator=g)
    return qx, qw, ws, bias, geo, residual


ACTIVATIONS = ["relu", "relu6", "silu", "gelu"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual, activation", [(True, a) for a in ACTIVATIONS] + [(True, ""), (False, "relu"),
                                                                                          (False, "silu")])
def test_kernel_epilogue_matches_reference(shape, with_residual, activation):
    """The native call with post-ops really runs (returns True) and gives the reference's
    conv + residual, then the activation, to a few ulp."""
    qx, qw, ws, bias, geo, residual = _kernel_case(shape)
    residual = residual if with_residual else None
    packed = C.pack_weight(qx, qw, *geo, 9, True)
    assert packed is not None
    out = torch.empty_like(_kernel_case(shape)[5])
    ran = _C.conv_int8_run(_views.view(qx), _views.view(qw), _views.view(packed), _views.view(ws), _views.view(bias),
                           0.05, 9, _views.view(out), *geo, _views.optional_view(residual), activation)
    assert ran, "oneDNN ran no fused kernel"
    ref = C.conv_int8_reference(qx, qw, ws, bias, 0.05, 9, *geo, residual, activation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if activation in ("relu", "relu6"):
        assert float(out.min()) >= 0 and (activation == "relu" or float(out.max()) <= 6)
    got = C.conv_int8(qx, qw, ws, bias, 0.05, 9, *geo, packed=packed, residual=residual, activation=activation)
    assert torch.equal(got, out)  # the op takes the same fused call


def test_kernel_rejects_a_residual_of_another_shape():
    qx, qw, ws, bias, geo, residual = _kernel_case(SHAPES[0])
    packed = C.pack_weight(qx, qw, *geo, 0, True)
    with pytest.raises(ValueError, match="residual"):
        C.conv_int8(qx, qw, ws, bias, 0.05, 0, *geo, packed=packed, residual=residual[:, :-1])
    out = torch.empty_like(residual)
    with pytest.raises(ValueError, match="residual"):
        _C.conv_int8_run(_views.view(qx), _views.view(qw), _views.view(packed), _views.view(ws), _views.view(bias),
                         0.05, 0, _views.view(out), *geo, _views.view(residual[:1]), "")
    with pytest.raises(ValueError, match="activation"):
        C.conv_int8(qx, qw, ws, bias, 0.05, 0, *geo, packed=packed, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        _C.conv_int8_run(_views.view(qx), _views.view(qw), _views.view(packed), _views.view(ws), _views.view(bias),
                         0.05, 0, _views.view(out), *geo, None, "tanh")


def _module(mode="static", shape=SHAPES[0], seed=0):
    n, c, sp, oc, k, stride, pad, groups = shape
    torch.manual_seed(seed)
    conv = (nn.Conv1d if len(sp) == 1 else nn.Conv2d)(c, oc, k, stride, pad, groups=groups).eval()
    x = torch.randn(n, c, *sp)
    lo, hi = float(x.min()), float(x.max())
    cls = ts.nn.Int8Conv1d if len(sp) == 1 else ts.nn.Int8Conv2d
    scale = (hi - lo) / 255 if mode == "static" else None
    return cls.from_float(conv, conv.weight, conv.bias, mode, scale, round(-lo / (hi - lo) * 255)), x


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("shape", SHAPES)
def test_module_fused_call_equals_the_ops_one_after_another(mode, shape):
    m, x = _module(mode, shape)
    with torch.no_grad():
        y = m(x)
        r = torch.randn_like(y)
        torch.testing.assert_close(m(x, r), y + r, rtol=1e-6, atol=1e-6)
        for act, fn in [("relu", torch.relu), ("relu6", F.relu6), ("silu", F.silu), ("gelu", F.gelu)]:
            torch.testing.assert_close(m(x, r, act), fn(y + r), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m(x, activation=act), fn(y), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="activation"):
            m(x, activation="tanh")


def test_module_takes_the_long_way_where_the_kernel_cannot():
    m, x = _module()
    with torch.no_grad():
        y = m(x)
        bcast = torch.randn(1, m.out_channels, 1, 1)  # broadcast: not the kernel's residual
        torch.testing.assert_close(m(x, bcast, "relu"), torch.relu(y + bcast))
        yb = m(x.bfloat16(), y.bfloat16(), "silu")
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(m(x[0], activation="relu"), torch.relu(m(x[0])))  # unbatched
    xg = x.clone().requires_grad_()
    r = torch.randn_like(y).requires_grad_()
    out = m(xg, r, "relu")
    out.sum().backward()
    assert xg.grad is not None and torch.equal(r.grad, (out > 0).float())


class Block(nn.Module):
    """A ResNet basic block with its forward written the ways models write it."""

    def __init__(self, style: str, c: int = 8):
        super().__init__()
        self.style = style
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)  # one module used twice, as torchvision does

    def forward(self, x):
        if self.style == "torchvision":
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += x
            return self.relu(out)
        if self.style == "shortcut_first":
            out = torch.relu(self.bn1(self.conv1(x)))
            return (x + self.bn2(self.conv2(out))).relu()
        if self.style == "no_relu":
            return self.bn2(self.conv2(F.relu(self.conv1(x)))) + x
        if self.style == "read_twice":  # conv1's output read twice: nothing may be fused there
            a = self.conv1(x)
            return self.relu(a) + self.conv2(a)
        if self.style == "into_shortcut":  # x.add_(conv(x)) writes x: not the kernel's add
            y = self.conv2(self.conv1(x))
            x = x.clone()
            return x.add_(y)
        raise ValueError(self.style)


def _quantized(model, x):
    for m in model.modules():  # non-trivial BatchNorms, so the folds matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    ref = copy.deepcopy(model)
    report = ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=[x], progress=False)
    return ref, report


def _unfused_copy(model):
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m.__dict__.pop("forward", None)
    return plain


@pytest.mark.parametrize("style, expect", [
    ("torchvision", {"conv1": "ReLU + requantize for conv2", "conv2": "residual add + ReLU"}),
    ("shortcut_first", {"conv1": "ReLU + requantize for conv2", "conv2": "residual add + ReLU"}),
    ("no_relu", {"conv1": "ReLU + requantize for conv2", "conv2": "residual add"}),
    ("read_twice", {"conv2": "residual add"}),
    ("into_shortcut", {"conv1": "requantize for conv2"}),  # the chain, not the add (int8_conv_chain.py)
])
def test_block_patterns(style, expect):
    torch.manual_seed(1)
    model = Block(style)
    x = torch.randn(4, 8, 6, 6)
    ref, report = _quantized(model, x)
    assert {n: m.epilogue for n, m in model.named_children() if getattr(m, "epilogue", "")} == expect
    assert isinstance(model.__dict__.get("forward"), FusedForward) == bool(expect)
    for name, what in expect.items():
        assert f"{what} fused" in next(c.reason for c in report.changes if c.name == name)
    with torch.no_grad():
        fused, plain = model(x), _unfused_copy(model)(x)
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)  # same ops, same bits up to fp order
        assert (fused - ref(x)).abs().max() <= 0.05 * ref(x).abs().max()  # and still the float model's result


def test_mobilenet_and_efficientnet_activations():
    class Inverted(nn.Module):  # MobileNetV2's residual block (ReLU6) with an EfficientNet SiLU and a GELU
        def __init__(self, c=8):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6(inplace=True))
            self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c),
                                    nn.SiLU())
            self.project, self.bn = nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c)
            self.head = nn.Conv2d(c, c, 1)

        def forward(self, x):
            y = x + self.bn(self.project(self.dw(self.expand(x))))  # linear bottleneck: add, no activation
            return F.gelu(self.head(y)) + F.relu6(y)

    torch.manual_seed(5)
    model = Inverted()
    x = torch.randn(2, 8, 7, 7)
    ref, _ = _quantized(model, x)
    got = {n: m.epilogue for n, m in model.named_modules() if getattr(m, "epilogue", "")}
    # traced through the Sequentials: expand.0 -> dw.0 -> project is one chain (int8_conv_chain.py)
    assert got == {"expand.0": "ReLU6 + requantize for dw.0", "dw.0": "SiLU + requantize for project",
                   "project": "residual add", "head": "GELU"}, got
    with torch.no_grad():
        torch.testing.assert_close(model(x), _unfused_copy(model)(x), rtol=1e-5, atol=1e-5)
        assert (model(x) - ref(x)).abs().max() <= 0.05 * ref(x).abs().max()
    hooked = Inverted()
    seen = []
    hooked.dw.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _quantized(hooked, x)  # a Sequential with a hook is called, not traced through: its hook fires
    assert hooked.expand[0].epilogue == "ReLU6" and hooked.dw[0].epilogue == "SiLU"
    seen.clear()
    with torch.no_grad():
        hooked(x)
    assert seen == [torch.Size((2, 16, 7, 7))]
    for approximate in ("tanh",):  # GELU's tanh form is not the kernel's: left as it is
        seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(approximate=approximate))
        _quantized(seq, torch.randn(2, 3, 6, 6))
        assert seq[0].epilogue == ""


def test_sequential_relu_and_untraceable_forward():
    class Gate(nn.Module):  # branches on a tensor value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 1, 1)

        def forward(self, x):
            y = self.conv(x)
            return F.relu(y) if float(y.mean()) > -1e9 else y

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), Gate())
    x = torch.randn(2, 3, 8, 8)
    ref, _ = _quantized(model, x)
    assert model[0].epilogue == "ReLU" and isinstance(model.__dict__.get("forward"), FusedForward)
    assert model[3].conv.epilogue == "" and "forward" not in model[3].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x), _unfused_copy(model)(x), rtol=1e-6, atol=1e-6)


def test_a_rewrite_that_changes_the_output_on_the_calibration_batch_is_dropped():
    class Aliased(nn.Module):  # `s += y` writes x through an alias; torch.fx records s + y
        def __init__(self):
            super().__init__()
            self.conv, self.keep = nn.Conv2d(4, 4, 3, 1, 1), nn.Identity()

        def forward(self, x):
            s = self.keep(x)
            s += self.conv(x)
            return s + x

    torch.manual_seed(4)
    model = nn.Sequential(Aliased(), nn.Conv2d(4, 4, 1), nn.ReLU())
    x = torch.randn(2, 4, 6, 6)
    _, report = _quantized(model, x.clone())
    assert model[0].conv.epilogue == "" and "forward" not in model[0].__dict__  # its rewrite differed
    assert model[1].epilogue == "ReLU"  # the other one is kept
    assert "fused" not in next(c.reason for c in report.changes if c.name == "0.conv")
    with torch.no_grad():
        torch.testing.assert_close(model(x.clone()), _unfused_copy(model)(x.clone()), rtol=1e-6, atol=1e-6)


class _Masked(nn.Module):
    """A block with an optional argument: torch.fx traces `mask` as a tensor, so the branch
    `if mask is not None` is taken even where a caller passes None or leaves it out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 1, 1)

    def forward(self, x, mask):
        y = F.relu(self.conv(x))
        return y * mask if mask is not None else y


class _WithDefault(_Masked):
    def forward(self, x, mask=None):
        return super().forward(x, mask)


class _Caller(nn.Module):
    def __init__(self, blk, pass_none: bool):
        super().__init__()
        self.blk, self.pass_none = blk, pass_none

    def forward(self, x):
        return self.blk(x, None) if self.pass_none else self.blk(x)


@pytest.mark.parametrize("blk, pass_none", [(_WithDefault(), False), (_Masked(), True)])
def test_optional_arguments_keep_their_code(blk, pass_none):
    # With a default the forward is left as written (its signature); without one it is traced
    # and rewritten, then fails on the calibration batch (y * None) and is dropped.
    torch.manual_seed(7)
    x = torch.randn(2, 4, 6, 6)
    model = _Caller(blk, pass_none)
    ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=[x], progress=False)
    assert "forward" not in blk.__dict__ and blk.conv.epilogue == ""
    with torch.no_grad():
        y = model(x)
        assert torch.equal(y, torch.relu(blk.conv(x)))
        assert torch.equal(blk(x, torch.zeros_like(y)), torch.zeros_like(y))


def test_a_forward_that_sets_attributes_keeps_its_code():
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.calls = nn.Conv2d(4, 4, 3, 1, 1), 0

        def forward(self, x):
            self.calls += 1
            self.last = F.relu(self.conv(x))
            return self.last

    torch.manual_seed(6)
    model = Caching()
    x = torch.randn(2, 4, 6, 6)
    _quantized(model, x)
    assert "forward" not in model.__dict__ and model.conv.epilogue == ""
    assert isinstance(model.calls, int) and isinstance(model.last, torch.Tensor)  # no proxies left behind
    calls = model.calls
    with torch.no_grad():
        model(x)
    assert model.calls == calls + 1


def test_a_forward_that_writes_into_a_list_or_dict_keeps_its_code():
    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.feats, self.cache = nn.Conv2d(4, 4, 3, 1, 1), [], {}

        def forward(self, x):
            y = F.relu(self.conv(x))
            self.feats.append(y)
            self.cache["last"] = y
            return y

    torch.manual_seed(6)
    model = Recording()
    x = torch.randn(2, 4, 6, 6)
    _quantized(model, x)
    assert "forward" not in model.__dict__ and model.conv.epilogue == ""
    assert all(isinstance(f, torch.Tensor) for f in model.feats)  # no proxies left behind
    model.feats.clear()
    with torch.no_grad():
        y = model(x)
        model(x)
    assert len(model.feats) == 2 and model.cache["last"] is model.feats[-1] and torch.equal(y, model.feats[0])


def test_fused_forward_runs_the_class_code_in_the_other_mode():
    """Tracing (in eval mode) fixed the module's own self.training: after model.train() its
    dropout and train-only branches run again, through the class's forward."""
    class Dropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = F.relu(self.conv(x)) + 5.0
            if self.training:
                y = y + 100.0
            return F.dropout(y, 0.5, self.training)

    torch.manual_seed(0)
    model = Dropping().eval()
    x = torch.randn(2, 8, 6, 6)
    _quantized(model, x)
    assert isinstance(model.__dict__.get("forward"), FusedForward)
    unfused = _unfused_copy(model)
    with torch.no_grad():
        assert torch.allclose(model(x), unfused(x), rtol=1e-3, atol=1e-5)  # eval: the fused graph
        model.train()
        unfused.train()
        torch.manual_seed(1)
        y = model(x)
        torch.manual_seed(1)
        assert torch.equal(y, unfused(x)) and 0.3 < float((y == 0).float().mean()) < 0.7


def test_fused_model_copies_pickles_saves_and_loads(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(Block("torchvision"), Block("shortcut_first"))
    x = torch.randn(2, 8, 6, 6)
    _quantized(model, x)
    with torch.no_grad():
        y = model(x)
        twin = copy.deepcopy(model)
        assert twin[0].forward.module is twin[0] and torch.equal(twin(x), y)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert back[0].forward.module is back[0] and torch.equal(back(x), y)
        path = tmp_path / "blocks.slim.safetensors"
        ts.save(model, path)
        fresh = ts.load(nn.Sequential(Block("torchvision"), Block("shortcut_first")).eval(), path)
        assert fresh[1].conv2.epilogue == "residual add + ReLU"
        assert torch.equal(fresh(x), y)
    assert fuse_conv_epilogues(model) == {}  # idempotent: a fused forward is not fused again


def test_a_conv_read_as_the_next_ones_input_and_residual_fuses_the_add_only():
    """h = c1(x); c2(h) + h: h is c2's input and its residual, so no chain hands codes from c1 to
    c2 (the rewrite raised 'still had 1 users' after the convs were swapped in, with no Report)."""
    class ReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

        def forward(self, x):
            h = self.c1(x)
            return self.fc((self.c2(h) + h).mean((2, 3)))

    torch.manual_seed(0)
    model = ReadTwice()
    x = torch.randn(2, 8, 6, 6)
    ref, report = _quantized(model, x)
    assert isinstance(model.c1, ts.nn.Int8Conv2d) and isinstance(model.fc, ts.nn.CompressedLinear)
    assert model.c2.epilogue == "residual add" and "requantize" not in model.c1.epilogue
    with torch.no_grad():
        y, want = model(x), ref(x)
    assert float((y - want).norm() / want.norm()) < 0.05


_CACHE_WRAP = """
import sys, torch
from tensorslim.ops import conv_int8 as C
torch.manual_seed(0)
qw = torch.randint(-127, 128, (16, 8, 3, 3), dtype=torch.int8)
geo = ([1, 1], [1, 1], [1, 1], 1)
xc = torch.randn(1, 8, 8, 8).abs()  # channels-last
packed = C.pack_weight(torch.empty(xc.shape, dtype=torch.uint8), qw, *geo, 0, True)
for n in range(2, 2 + int(sys.argv[1])):  # other shapes: the primitive cache wraps (257 entries)
    C.impl_name(torch.empty(n, 8, 8, 8, dtype=torch.uint8), qw, *geo, 0, True)
# 7-bit codes: exact on oneDNN's kernels without VNNI too (int16 pair sums; the AVX2-capped run)
w_scales, bias, scale = torch.rand(16) * 0.01 + 0.001, torch.randn(16), float(xc.max()) / 127
out = C.conv_int8_quantizing(xc, scale, 0, 127, qw, w_scales, bias, *geo, packed, None, "relu")
q = torch.clamp(torch.round(xc / scale), 0, 127).to(torch.uint8)
ref = C.conv_int8_reference(q, qw, w_scales, bias, scale, 0, *geo, None, "relu")
assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
"""


@pytest.mark.slow
@pytest.mark.parametrize("fill", [512, 769])
def test_fused_call_after_the_primitive_cache_wrapped(fill):
    """conv_int8_run kept a reference into oneDNN's primitive cache across a second lookup that
    could clear it: with freed memory scribbled over (MALLOC_PERTURB_) the fused call crashed
    (rc 139) once the cache had wrapped at these fills."""
    skip_without_onednn()
    env = {**os.environ, "MALLOC_PERTURB_": "165"}
    res = subprocess.run([sys.executable, "-c", _CACHE_WRAP, str(fill)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
