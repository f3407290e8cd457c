"""Int8Conv2d chains (nn/int8_conv_chain.py): where one conv's output is read by nothing but the
next conv, the first hands the second its uint8 input codes, requantized in torch's kernel.
Checked against the two module calls they replace (our quantizer on the fp32 output): the
same codes but for rare halfway ties, the same model outputs; and every case where the chain
must step aside (batch 1, hooks, gradients, the route switched off) runs the module calls.
Run also under the AVX2 caps (7-bit codes: the handed codes are clamped to 127)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.nn import int8_conv_chain
from tensorslim.ops import torch_onednn as CT

pytestmark = pytest.mark.skipif(not CT.available(), reason="this torch has no oneDNN int8 convolution ops")


class Basic(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class Bottleneck(nn.Module):
    """torchvision's bottleneck: 1x1 down, 3x3 (strided), 1x1 up, with a strided 1x1 shortcut."""

    def __init__(self, c=32, mid=64, out=128, stride=2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)
        self.down = nn.Sequential(nn.Conv2d(c, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.down(x)
        return self.relu(out)


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block as it nests: Sequentials of conv + BatchNorm + ReLU6
    inside the block's `conv` Sequential, the residual added in the block's forward."""

    def __init__(self, c=32, hidden=96):
        super().__init__()

        def conv_bn_relu6(cin, cout, k, groups=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

        self.conv = nn.Sequential(conv_bn_relu6(c, hidden, 1), conv_bn_relu6(hidden, hidden, 3, groups=hidden),
                                  nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


def _model(block_class):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), block_class(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten())
    for m in model.modules():  # non-trivial BatchNorms
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(32, 3, 16, 16)
    ref = copy.deepcopy(model)
    report = ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=[x], progress=False)
    return model, ref, report, x


@pytest.fixture
def handed(monkeypatch):
    """Counts the convs that handed codes on."""
    calls = []
    real = CT.conv2d_to_codes
    monkeypatch.setattr(CT, "conv2d_to_codes", lambda *a: calls.append(1) or real(*a))
    return calls


def _module_calls(monkeypatch):
    """Makes every chain run its convs as module calls (what the model did before chains)."""
    monkeypatch.setattr(int8_conv_chain, "_routes", lambda convs, *a: [None] * len(convs))


def _close(got, ref):
    """The same outputs but for a rare code one apart inside (a halfway tie, or oneDNN's fp32
    epilogue an ulp from the fp32 output it writes; seen under the AVX2 caps): 34 of 4096
    bottleneck outputs moved by <= 4e-5 of 0.86. A wrong scale or zero point moves them all."""
    assert float((got - ref).norm()) <= 1e-4 * float(ref.norm())
    assert float((got - ref).abs().max()) <= 1e-3 * float(ref.abs().max())


@pytest.mark.parametrize("block, chained", [(Basic, {"conv1": "ReLU + requantize for conv2"}),
                                            (Bottleneck, {"conv1": "ReLU + requantize for conv2",
                                                          "conv2": "ReLU + requantize for conv3"}),
                                            (InvertedResidual, {"conv.0.0": "ReLU6 + requantize for conv.1.0",
                                                                "conv.1.0": "ReLU6 + requantize for conv.2"})])
def test_chain_gives_the_module_calls_result(block, chained, handed, monkeypatch):
    model, ref, report, x = _model(block)
    got = {n: m.epilogue for n, m in model[2].named_modules() if "requantize" in getattr(m, "epilogue", "")}
    assert got == chained
    for name, what in chained.items():
        assert f"{what} fused" in next(c.reason for c in report.changes if c.name == f"2.{name}")
    with torch.inference_mode():
        y = model(x)
        assert len(handed) == len(chained)
        monkeypatch.undo()
        _module_calls(monkeypatch)
        _close(y, model(x))
        assert (y - ref(x)).abs().max() <= 0.05 * ref(x).abs().max()  # still the float model's result


@pytest.mark.parametrize("code_max", [255, 127])
@pytest.mark.parametrize("activation", ["", "relu", "relu6", "silu"])
def test_handed_codes_are_the_quantizer_codes_of_the_fp32_output(code_max, activation):
    """conv2d_to_codes against our quantizer on conv2d_from_codes' fp32 output: equal but where
    y / scale lies within rounding of halfway (oneDNN multiplies by 1 / scale, we divide),
    and there one code apart."""
    g = torch.Generator().manual_seed(1)
    n, c, h, oc = 16, 32, 12, 48
    qw = torch.randint(-127, 128, (oc, c, 3, 3), generator=g, dtype=torch.int32).to(torch.int8)
    ws, bias = torch.rand(oc, generator=g) * 0.01 + 1e-3, torch.randn(oc, generator=g)
    packed = CT.prepack(qw, ws, 0.05, 7, [1, 1], [1, 1], [1, 1], 1, [n, c, h, h])
    codes = torch.randint(0, 128, (n, h, h, c), generator=g, dtype=torch.int32).to(torch.uint8).movedim(-1, 1)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    out_scale, out_zp = 0.037, 9
    with torch.inference_mode():
        handed_codes = CT.conv2d_to_codes(codes, 0.05, 7, packed, ws, bias, *geo, activation, out_scale, out_zp,
                                          code_max)
        y = CT.conv2d_from_codes(codes, 0.05, 7, packed, ws, bias, *geo, None, activation)
        ours = CT.quantize_input(y.movedim(1, -1).contiguous(), out_scale, out_zp, code_max)
    assert handed_codes.dtype == torch.uint8 and handed_codes.shape == ours.shape
    diff = (handed_codes.int() - ours.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    assert int(handed_codes.max()) <= code_max and int(handed_codes.max()) > 100  # the range is used


def test_batch_one_hooks_gradients_and_the_switch_take_the_module_calls(handed, monkeypatch):
    model, _, _, x = _model(Basic)
    with torch.inference_mode():
        y = model(x)
        assert len(handed) == 1
        handed.clear()
        y1 = model(x[:1])  # too small for torch's kernel
        assert not handed
        seen = []
        hook = model[2].conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        _close(model(x), y)
        hook.remove()
        assert seen == [torch.Size((32, 32, 16, 16))] and not handed
        previous = CT.set_enabled(False)
        try:
            off = model(x)
        finally:
            CT.set_enabled(previous)
        assert not handed
        _close(off, y)
    xg = x.clone().requires_grad_()
    out = model(xg)
    assert not handed
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    _module_calls(monkeypatch)
    with torch.inference_mode():
        torch.testing.assert_close(model(x[:1]), y1, rtol=0, atol=0)


def test_chained_model_copies_pickles_saves_and_loads(tmp_path, handed):
    model, _, _, x = _model(Basic)
    with torch.inference_mode():
        y = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), y)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)
        path = tmp_path / "chain.slim.safetensors"
        ts.save(model, path)
        fresh = ts.load(nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), Basic(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten()).eval(), path)
        assert fresh[2].conv1.epilogue == "ReLU + requantize for conv2"
        handed.clear()
        assert torch.equal(fresh(x), y) and len(handed) == 1


def test_a_strided_pointwise_conv_starts_a_chain_but_never_joins_one(handed):
    """A strided 1 x 1 conv reads every stride-th input position (picked before quantizing):
    codes handed to it would be the wrong positions, so it may only start a run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 1, 2), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, 1, 1)).eval()
    x = torch.randn(32, 3, 32, 32)
    ref = copy.deepcopy(model)
    ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=[x], progress=False)
    assert [model[i].epilogue for i in (0, 2, 4)] == ["ReLU", "ReLU + requantize for 4", ""]
    with torch.inference_mode():
        y = model(x)
        assert len(handed) == 1
        assert float((y - ref(x)).norm()) <= 0.05 * float(ref(x).norm())


def test_compiled_model_takes_the_module_calls(handed):
    """Under torch.compile the chain steps aside (dynamo traces the module calls); the result is
    the eager one's."""
    model, _, _, x = _model(Basic)
    with torch.no_grad():
        y = model(x)
        handed.clear()
        got = torch.compile(model, backend="eager")(x)
    assert not handed
    _close(got, y)
