"""Binary / ternary / XNOR: packing layout, kernels against plain-PyTorch references,
the modules and ts.quantize with the Binary / Ternary configs."""
import copy
import math

import pytest
import torch
from torch import nn

import tensorslim as ts
from conftest import sqnr_db
from tensorslim.ops import binary as B


def _float64_bound(x, w, y):
    """Summation error bound of an fp32 kernel against float64: the AVX-512 / AVX2 kernels add
    at most K/16 + 4 / K/8 + 3 terms per lane, the reference F.linear (MKL) at most K; the binary kernel
    forms 2P - S from two such sums. 3 * (K + 8) * 2^-24 * (|x| @ |w|^T) covers all, plus
    one rounding of the result."""
    K = x.shape[-1]
    return 3 * (K + 8) * 2.0 ** -24 * (x.abs().double() @ w.abs().double().T) + 2.0 ** -22 * y.abs().double()


def test_packing_layout():
    # binary: bit 1 = +1 (w >= 0, zero included), LSB first, rows padded to whole bytes
    w = torch.tensor([[1.0, -1, -2, 0, 3, 1, 1, -1, 5]])
    bits, scale = B.binarize(w)
    assert bits.tolist() == [[0b01111001, 0b00000001]]
    assert scale.tolist() == [pytest.approx(15 / 9)]
    assert torch.equal(B.unpack_signs(bits, 9), torch.tensor([[1.0, -1, -1, 1, 1, 1, 1, -1, 1]]))
    # ternary: two's complement 2-bit codes, lowest bits first: +1 = 01, 0 = 00, -1 = 11
    t = torch.tensor([[1, 0, -1, 1, -1]])
    codes = B.pack_trits(t)
    assert codes.tolist() == [[0b01110001, 0b00000011]]
    assert torch.equal(B.unpack_trits(codes, 5), t.float())


def test_twn_rule():
    w = torch.tensor([[0.1, -0.9, 0.5, -0.05, 1.2, 0.0]])
    # mean |w| = 2.75 / 6, threshold 0.7 * that = 0.3208: kept 0.9, 0.5, 1.2 -> scale 2.6 / 3
    codes, scales = B.ternary_codes_scales(w)
    assert codes.tolist() == [[0, -1, 1, 0, 1, 0]]
    assert scales.item() == pytest.approx(2.6 / 3, rel=1e-6)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_packing_matches_the_format_table(fmt):
    """Our packers agree bit for bit with the format table's encoders (ops.quantize_lowbit)."""
    if fmt not in ts.FORMATS or not hasattr(ts.ops, "quantize_lowbit"):
        pytest.skip("format table row not present")
    torch.manual_seed(0)
    for K in (1, 7, 64, 1000):
        w = torch.randn(9, K)
        q, s = B.binarize(w) if fmt == "binary" else B.ternarize(w)
        q2, s2, _, _ = ts.ops.quantize_lowbit(w, fmt, K)
        assert torch.equal(q, q2) and torch.equal(s, s2.flatten())


def test_gaussian_sqnr_matches_theory():
    """For N(0, 1) weights sign(w) * mean|w| keeps (E|w|)^2 = 2/pi of the energy:
    SQNR = -10 log10(1 - 2/pi) = 4.40 dB. TWN keeps |w| > t = 0.7 E|w| with scale
    E[|w| ; |w| > t] / P(|w| > t), leaving 1 - (2 phi(t))^2 / (2 (1 - Phi(t))): 7.17 dB."""
    torch.manual_seed(0)
    w = torch.randn(256, 4096)
    bits, s = B.binarize(w)
    binary = sqnr_db(w, B.unpack_signs(bits, 4096) * s[:, None])
    assert abs(binary - (-10 * math.log10(1 - 2 / math.pi))) < 0.05
    codes, s = B.ternarize(w)
    ternary = sqnr_db(w, B.unpack_trits(codes, 4096) * s[:, None])
    t = 0.7 * math.sqrt(2 / math.pi)
    phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    tail = 1 - math.erf(t / math.sqrt(2))  # P(|w| > t)
    assert abs(ternary - (-10 * math.log10(1 - (2 * phi) ** 2 / tail))) < 0.05


@pytest.mark.parametrize("kind", ["binary", "ternary", "xnor"])
def test_kernels_match_references(kind, isa):
    torch.manual_seed(1)
    for K in (1, 9, 100, 513, 1031):
        w = torch.randn(19, K)
        q, s = B.ternarize(w) if kind == "ternary" else B.binarize(w)
        bias = torch.randn(19)
        fn = {"binary": B.binary_linear, "ternary": B.ternary_linear, "xnor": B.xnor_linear}[kind]
        for M in (1, 3, 8, 17):
            x = torch.randn(M, K)
            got = fn(x, q, s, bias, K)
            ref = fn(x, q, s, bias, K, backend="reference")
            if kind == "xnor":  # exact integer dots and the same fp32 steps: bit for bit
                assert torch.equal(got, ref), (K, M)
                continue
            wdeq = (B.unpack_trits(q, K) if kind == "ternary" else B.unpack_signs(q, K)) * s[:, None]
            want = x.double() @ wdeq.double().T + bias.double()
            bound = _float64_bound(x, wdeq, want)
            assert ((got.double() - want).abs() <= bound).all(), (K, M)
            assert ((ref.double() - want).abs() <= bound).all(), (K, M)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_huge_and_non_finite_inputs_follow_the_reference(kind, isa):
    """Float math at the range's edge, every batch below the panel path: binary's 2 * P - S
    overflowed (inf, or inf - inf = NaN) where the +-1 sum is finite; AVX-512 ternary at
    batch 1-2 skipped zero trits, so a NaN there vanished (0 * NaN = NaN in the reference)."""
    torch.manual_seed(3)
    K = 64
    q, s = B.ternarize(torch.randn(37, K)) if kind == "ternary" else B.binarize(torch.randn(37, K))
    fn = B.ternary_linear if kind == "ternary" else B.binary_linear
    wdeq = (B.unpack_trits(q, K) if kind == "ternary" else B.unpack_signs(q, K)) * s[:, None]
    special = torch.randn(4, K)
    special[0, 5] = 2e38  # one value near FLT_MAX
    special[1] = 6e36  # a whole row: S past FLT_MAX, every +-1 sum below it
    special[2, 7], special[3, 9] = float("nan"), float("inf")
    for M in (1, 2, 3, 5, 63):
        for i in range(4):
            x = torch.randn(M, K)
            x[M // 2] = special[i]
            got, ref = fn(x, q, s, None, K).double(), fn(x, q, s, None, K, backend="reference").double()
            finite = torch.isfinite(ref)
            assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[ref.isinf()], ref[ref.isinf()])
            scale = x.double().abs().nan_to_num(posinf=0) @ (wdeq.abs().double().T)  # fp32 rounding's scale
            assert ((got - ref).abs()[finite] <= 1e-6 * scale[finite]).all(), (M, i)
            if i < 2:
                assert torch.isfinite(got).all(), (M, i)
            else:  # every output reads x[., 7] / x[., 9], if only times 0
                assert not torch.isfinite(got[M // 2]).any(), (M, i)


def test_xnor_reference_is_xnor_net():
    """The reference itself against XNOR-Net's definition: (sign(x) . sign(w)) * mean|x| * mean|w|."""
    torch.manual_seed(2)
    x, w = torch.randn(4, 77), torch.randn(6, 77)
    bits, s = B.binarize(w)
    y = B.xnor_linear(x, bits, s, None, 77)
    sx, sw = torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0)
    want = (sx.double() @ sw.double().T) * x.double().abs().mean(1, keepdim=True) * w.double().abs().mean(1)
    assert torch.allclose(y.double(), want, rtol=1e-6, atol=0)


def test_ops_pass_opcheck_and_run_on_meta():
    """Schema, fake (meta) implementations and AOT dispatch of the three custom ops."""
    torch.manual_seed(3)
    w, x, b = torch.randn(12, 37), torch.randn(3, 37), torch.randn(12)
    bits, s = B.binarize(w)
    codes, t = B.ternarize(w)
    for op, q, sc in ((torch.ops.tensorslim.linear_binary, bits, s), (torch.ops.tensorslim.linear_xnor, bits, s),
                      (torch.ops.tensorslim.linear_ternary, codes, t)):
        torch.library.opcheck(op.default, (x, q, sc, b, 0))
        y = op(x.to("meta"), q.to("meta"), sc.to("meta"), b.to("meta"), 0)
        assert y.device.type == "meta" and y.shape == (3, 12)


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(96, 200))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(200, 130))
    model.add_module("head", nn.Linear(130, 10))
    return model


@pytest.mark.parametrize("preset,cls,per_byte", [("binary", ts.BinaryLinear, 8), ("xnor", ts.BinaryLinear, 8),
                                                 ("ternary", ts.TernaryLinear, 4)])
def test_quantize_replaces_packs_and_skips_head(preset, cls, per_byte, tmp_path):
    model = _mlp()
    ref = copy.deepcopy(model)
    report = ts.quantize(model, preset, progress=False)
    assert [c.name for c in report.changed] == ["fc1", "fc2"]
    assert [(c.name, c.reason) for c in report.skipped] == [("head", "output head (skip_output_head=True)")]
    x = torch.randn(5, 96)
    for name in ("fc1", "fc2"):
        mod, orig = model.get_submodule(name), ref.get_submodule(name)
        assert isinstance(mod, cls) and "weight" not in mod.state_dict()
        after = sum(t.numel() * t.element_size() for t in mod.state_dict().values())
        n, k = orig.out_features, orig.in_features
        assert after == n * -(-k // per_byte) + 4 * n + 4 * n  # packed weights, fp32 scales, fp32 bias
    # the module computes what its dequantized weight says (float activations) or XNOR-Net
    fc1 = model.fc1
    if preset == "xnor":
        want = B.xnor_linear(x, fc1.qweight, fc1.scales, fc1.bias, 96, backend="reference")
        assert torch.equal(fc1(x), want)
    else:
        want = nn.functional.linear(x, fc1.dequantized_weight(), fc1.bias)
        assert torch.allclose(fc1(x), want, rtol=0, atol=1e-4)
    rows = {r.name: r for r in ts.summary(model).changes}
    assert rows["fc1"].format == fc1.describe() and rows["head"].action == "skipped"
    # safetensors round trip into a fresh float model
    path = tmp_path / "m.slim.safetensors"
    ts.save(model, path)
    fresh = _mlp(seed=5)
    ts.load(fresh, path)
    assert isinstance(fresh.fc2, cls) and fresh.fc2.describe() == model.fc2.describe()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_configs_round_trip_and_presets():
    for cfg in (ts.Binary(), ts.Binary(activations=True, exclude=("head",)), ts.Ternary(skip_output_head=False)):
        assert ts.Config.from_json(cfg.to_json()) == cfg
    assert ts.PRESETS["xnor"]() == ts.Binary(activations=True)
    assert ts.PRESETS["binary"]() == ts.Binary() and ts.PRESETS["ternary"]() == ts.Ternary()


def test_bad_inputs_raise():
    bits, s = B.binarize(torch.randn(4, 20))
    with pytest.raises(ValueError, match="last dimension 20"):
        B.binary_linear(torch.randn(2, 21), bits, s, None, 20)
    with pytest.raises(TypeError, match="float"):
        B.binary_linear(torch.ones(2, 20, dtype=torch.int32), bits, s, None, 20)
    with pytest.raises(ValueError, match="oneDNN"):
        B.binary_linear(torch.randn(2, 20), bits, s, None, 20, backend="onednn")
    with pytest.raises(ValueError, match=r"qweight: expected uint8 \[out_features, 5\]"):
        B.ternary_linear(torch.randn(2, 20), bits, s, None, 20)  # binary bits are not ternary codes
    for backend in ("auto", "reference"):
        with pytest.raises(ValueError, match=r"scales: expected float32 \[4\]"):
            B.binary_linear(torch.randn(2, 20), bits, torch.ones(3), None, 20, backend=backend)
        with pytest.raises(ValueError, match=r"bias: expected float32 \[4\]"):
            B.xnor_linear(torch.randn(2, 20), bits, s, torch.ones(5), 20, backend=backend)
    with pytest.raises(ValueError, match="weight: contains NaN"):
        B.binarize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="backend"):
        ts.Binary(backend="onednn")
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer '0'.*NaN or Inf"):
        ts.quantize(model, "ternary", progress=False)
    assert isinstance(model[0], nn.Linear)  # left as it was


def test_bf16_and_3d_inputs():
    lin = nn.Linear(40, 24)
    mod = ts.BinaryLinear.from_linear(lin)
    x = torch.randn(2, 3, 40)
    y = mod(x)
    assert y.shape == (2, 3, 24)
    assert torch.allclose(y, mod(x.reshape(6, 40)).reshape(2, 3, 24))
    yb = mod(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and sqnr_db(y, yb.float()) > 30
