"""Quantization-aware training: fake quant == converted kernels (codes exact, outputs within
the summation-order bound), STE / LSQ gradients, accuracy recovery on digits, errors."""
import copy
import dataclasses
import importlib.util
import io
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorslim as ts
import tensorslim.config as C
from tensorslim.qat import ActivationSignQuant, BinaryFakeQuant, IntFakeQuant, QATLinear

ROOT = Path(__file__).resolve().parents[2]


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 96))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(96, 64))
    model.add_module("head", nn.Linear(64, 10))
    return model


def _configs():
    cfgs = [(ts.Int8WeightOnly(), True), (ts.Int4WeightOnly(group_size=32), True),
            (ts.Int4WeightOnly(group_size=32, symmetric=False), True), (ts.Binary(), True),
            (ts.Binary(activations=True), True), (ts.Ternary(), True)]
    if "int2" in ts.FORMATS:
        cfgs += [(ts.IntWeightOnly(bits=2, group_size=None), True),
                 (ts.IntWeightOnly(bits=3, group_size=32, symmetric=False), True)]
    for name in ("FP8WeightOnly", "NVFP4", "MXFP4"):  # the float formats, when present
        if hasattr(C, name):
            cfgs.append((getattr(C, name)(), True))  # LSQ details: test_qat_float.py
    return [pytest.param(c, lsq, id=f"{type(c).__name__}-{getattr(c, 'bits', '')}-lsq{lsq}")
            for c, can_lsq in cfgs for lsq in ((False, True) if can_lsq else (False,))]


def _train_steps(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _dequantized(mod) -> torch.Tensor:
    if isinstance(mod, (ts.BinaryLinear, ts.TernaryLinear)):
        return mod.dequantized_weight()
    if isinstance(mod, ts.WeightOnlyLinear):
        return mod.dequantized_weight()
    return ts.ops.dequantize_lowbit(mod.qweight, mod.scales, mod.zero_points, getattr(mod, "tensor_scale", None),
                                    mod.fmt, mod.group_size, mod.in_features)


@pytest.mark.parametrize("cfg,lsq", _configs())
def test_convert_equals_fake_quant(cfg, lsq):
    model = _mlp()
    x = torch.randn(7, 64)
    report = ts.prepare_qat(model, cfg, learnable_scales=lsq, progress=False)
    assert [c.name for c in report.changed] == ["fc1", "fc2"] and report.skipped[0].name == "head"
    _train_steps(model, x)  # weights and LSQ scales move away from their initial values
    fq_weights = {n: model.get_submodule(n).fake_quantized_weight().detach() for n in ("fc1", "fc2")}
    trained = {n: model.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}
    qat_quantizers = {n: model.get_submodule(n).weight_fake_quant for n in ("fc1", "fc2")}
    with torch.no_grad():
        y_fake = model(x)
    ts.convert(model)
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    for name in ("fc1", "fc2"):
        mod = model.get_submodule(name)
        assert "weight" not in mod.state_dict()
        # the packed codes/scales decode to exactly the weight the fake quantizer trained with
        assert torch.equal(_dequantized(mod), fq_weights[name]), name
        fq = qat_quantizers[name]
        if lsq and isinstance(fq, IntFakeQuant):  # codes from the learned scale, computed here
            s = fq.scale.detach().clamp_min(1e-8)
            z = fq.zero_point
            g = trained[name].reshape(s.shape[0], s.shape[1], -1)
            codes = (torch.round(g / s[..., None]) + z[..., None]).clamp(fq.spec.qmin, fq.spec.qmax)
            want = ts.ops.pack_codes(codes.reshape(trained[name].shape).to(torch.int32), fq.spec.name)
            assert torch.equal(mod.qweight, want) and torch.equal(mod.scales, s)
        if not lsq:  # ...which, without learned scales, is what post-training quantization packs
            ptq = nn.Sequential()
            ptq.add_module(name, nn.Linear(mod.in_features, mod.out_features))
            ptq.get_submodule(name).weight.data.copy_(trained[name])
            ts.quantize(ptq, cfg, progress=False)
            assert torch.equal(ptq.get_submodule(name).qweight, mod.qweight)
            assert torch.equal(ptq.get_submodule(name).scales, mod.scales)
    with torch.no_grad():
        y = model(x)
    # Same dequantized weights (asserted above); the kernels differ from F.linear only in
    # summation order (and XNOR in where a_scale * w_scale is rounded), so the difference
    # is bounded by the fp32 summation error through the two quantized layers: a few
    # K * 2^-24 relative to the output scale.
    assert (y - y_fake).abs().max() <= 1e-5 * y_fake.abs().max()


def test_int_ste_passes_inside_the_range_only():
    w = torch.tensor([[0.3, -0.2, 2.0, -2.6, 0.05, 0.9, -0.7, 0.0]], requires_grad=True)
    fq = IntFakeQuant(ts.FORMATS["int4"], 8, w.detach(), learnable=True)
    with torch.no_grad():
        fq.scale.fill_(0.25)  # int4 codes -8..7: |w| / 0.25 > 7 (or < -8) is clipped
    wq = fq(w)
    assert torch.equal(wq.detach(), (torch.round(w.detach() / 0.25).clamp(-8, 7) * 0.25))
    wq.sum().backward()
    assert w.grad.tolist() == [[1, 1, 0, 0, 1, 1, 1, 1]]  # 2.0 -> 8 and -2.6 -> -10.4 clip
    # LSQ: d wq / d s = round(w/s) - w/s inside, the clipped code outside, times g
    v = w.detach() / 0.25
    inside = (v >= -8) & (v <= 7)
    want = torch.where(inside, torch.round(v) - v, v.clamp(-8, 7).round()).sum() / math.sqrt(8 * 7)
    assert fq.scale.grad.item() == pytest.approx(want.item(), rel=1e-5)


def test_binary_ste_clips_at_one_and_lsq_scale_gradient():
    w = torch.tensor([[0.5, -0.25, 1.5, -0.75]], requires_grad=True)
    fq = BinaryFakeQuant(w.detach(), learnable=True)
    assert fq.scale.item() == pytest.approx(0.75)  # mean |w|
    wq = fq(w)
    assert wq.detach().tolist() == [[0.75, -0.75, 0.75, -0.75]]
    wq.sum().backward()
    assert w.grad.tolist() == [[0.75, 0.75, 0.0, 0.75]]  # |w| > 1 gets no gradient
    assert fq.scale.grad.item() == pytest.approx(0 / 2)  # signs sum to 0, g = 1/sqrt(4)
    (fq(w) * torch.tensor([[1.0, 0, 0, 0]])).sum().backward()
    assert fq.scale.grad.item() == pytest.approx(1 / 2)


def test_binary_activation_ste_holds_the_row_scale_constant():
    x = torch.tensor([[0.5, -0.25, 1.5, -0.75], [2.0, 0.1, -0.3, 0.2]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.25, 1.0, -1.0, 2.0]])
    (ActivationSignQuant()(x) * g).sum().backward()
    scale = x.detach().abs().mean(1, keepdim=True)  # 0.75, 0.65
    assert torch.allclose(x.grad, g * scale * (x.detach().abs() <= 1), atol=1e-7)


def _load_example():
    spec = importlib.util.spec_from_file_location("qat_digits", ROOT / "examples" / "qat_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fastest for these tiny matrices
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("name", ["int2", "binary"])
def test_qat_recovers_ptq_loss_on_digits(name, one_thread):
    """MLP 64-64-64-10 on digits, every layer quantized: PTQ loses several points; a few
    epochs of QAT (measured on the converted model, real kernels) win most of them back."""
    if name == "int2" and "int2" not in ts.FORMATS:
        pytest.skip("int2 is not in the format table")
    ex = _load_example()
    data = ex.digits(seed=0)
    model = ex.float_model(data, seed=0)
    fp32 = ex.accuracy(model, data[2], data[3])
    cfg = ex.CONFIGS[name]
    ptq = ex.accuracy(ex.ptq(model, cfg), data[2], data[3])
    converted = ex.qat(model, cfg, data, seed=0)
    assert all(not isinstance(m, (QATLinear, nn.Linear)) for m in (converted.fc1, converted.fc2, converted.head))
    qat = ex.accuracy(converted, data[2], data[3])
    assert fp32 >= 0.95
    assert fp32 - ptq >= 0.04, (fp32, ptq)  # the loss QAT is meant to recover is real
    assert qat - ptq >= 0.6 * (fp32 - ptq), (fp32, ptq, qat)


def test_error_paths():
    model = _mlp()
    with pytest.raises(ValueError, match="unknown preset"):
        ts.prepare_qat(model, "int1", progress=False)
    with pytest.raises(TypeError, match="not supported by QAT"):
        ts.prepare_qat(model, C.Config(), progress=False)
    with pytest.raises(TypeError, match="expected a tensorslim config"):
        ts.prepare_qat(model, 4, progress=False)
    if "gptq" in C.WEIGHT_ONLY_ALGORITHMS:
        with pytest.raises(ValueError, match="algorithm='rtn'"):
            ts.prepare_qat(model, ts.Int4WeightOnly(algorithm="gptq"), progress=False)
    with pytest.raises(ValueError, match="no QAT layers"):
        ts.convert(model)
    assert all(type(m) is nn.Linear for m in (model.fc1, model.fc2, model.head))  # untouched
    ts.prepare_qat(model, "binary", progress=False)
    with pytest.raises(ValueError, match="already prepared"):
        ts.prepare_qat(model, "ternary", progress=False)
    # a layer that cannot be packed (training diverged to NaN) leaves every layer as it was
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'fc2'.*NaN"):
        ts.convert(model)
    assert isinstance(model.fc1, QATLinear) and isinstance(model.fc2, QATLinear)
    converted = _mlp()
    ts.quantize(converted, ts.Int8WeightOnly(), progress=False)
    with pytest.warns(UserWarning, match="ts.prepare_qat: nothing was compressed.*already compressed"):
        ts.prepare_qat(converted, ts.Int8WeightOnly(), progress=False)  # silent before, as ts.prune warns


def test_layers_qat_cannot_handle_are_skipped_with_reasons():
    model = _mlp()
    model.fc1 = nn.Linear(40, 96, device="meta")
    report = ts.prepare_qat(model, ts.Int4WeightOnly(group_size=32), progress=False)
    reasons = {c.name: c.reason for c in report.skipped}
    assert reasons["fc1"] == "weight is on the meta device (no data to train)"
    assert isinstance(model.fc2, QATLinear) and type(model.fc1) is nn.Linear


def test_width_not_a_multiple_of_the_group_is_prepared():
    model = _mlp()
    model.fc1 = nn.Linear(40, 96)  # groups of 32 and 8
    report = ts.prepare_qat(model, ts.Int4WeightOnly(group_size=32), progress=False)
    assert "fc1" not in {c.name for c in report.skipped} and isinstance(model.fc1, QATLinear)
    ts.convert(model)
    assert model.fc1.scales.shape == (96, 2)


def test_convert_keeps_training_parameters_and_saves(tmp_path):
    model = _mlp()
    opt_params = {id(p) for p in model.parameters()}
    ts.prepare_qat(model, ts.Ternary(), learnable_scales=True, progress=False)
    # the float weights are the same Parameter objects: an optimizer made earlier still trains them
    assert {id(model.fc1.weight), id(model.fc1.bias)} <= opt_params
    assert isinstance(model.fc1.weight_fake_quant.scale, nn.Parameter)
    x = torch.randn(3, 64)
    _train_steps(model, x)
    path = tmp_path / "qat.slim.safetensors"
    with pytest.raises(ValueError, match="layer 'fc1' is prepared for QAT.*ts.convert"):
        ts.save(model, path)  # the format has no QAT layers: it would load as a float model
    assert not path.exists()
    report = ts.convert(model)
    assert [c.format for c in report.changed] == ["ternary w2 per-channel"] * 2
    ts.save(model, path)
    fresh = _mlp(seed=3)
    ts.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("config,lsq", _configs())
def test_prepared_model_deep_copies_and_pickles(config, lsq):
    """Every QAT format: copy.deepcopy and a pickle round trip give a model computing the same
    outputs (and converting to the same packed layers), independent of the original."""
    model = _mlp()
    cfg = dataclasses.replace(config, filter_fn=lambda name, mod: name != "fc2")  # a lambda in the config
    ts.prepare_qat(model, cfg, learnable_scales=lsq, progress=False)
    x = torch.randn(8, 64)
    with torch.no_grad():
        want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)  # pickles the whole module tree
    buf.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(buf, weights_only=False)]
    for other in copies:
        assert isinstance(other.fc1, QATLinear) and not isinstance(other.fc2, QATLinear)
        with torch.no_grad():
            assert torch.equal(other(x), want)
        assert other.fc1.weight is not model.fc1.weight
    _train_steps(copies[0], x, steps=1)  # training a copy leaves the original alone
    with torch.no_grad():
        assert torch.equal(model(x), want)
    ts.convert(copies[1])
    ts.convert(model)
    with torch.no_grad():
        assert torch.equal(copies[1](x), model(x))



@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_fake_quant_of_huge_finite_weights_is_finite(bits):
    """hi - lo of weights near +-3e38 overflows fp32; the scale must not (it gave NaN weights)."""
    spec = ts.formats.integer_format(bits, False)
    torch.manual_seed(0)
    w = torch.randn(3, 64)
    w[0, 3], w[0, 5], w[1, 40], w[2, 0] = 3e38, -3e38, 3e38, -3e38
    fq = IntFakeQuant(spec, 32, w)
    out = fq(w)
    scales = fq.export(w)["scales"]
    assert torch.isfinite(out).all() and torch.isfinite(scales).all()
    step = scales.repeat_interleave(32, dim=1)
    assert ((out.double() - w.double()).abs() <= step.double() * 1.0001).all()
    _, kernel_scales, kernel_zps = ts.ops.quantize(w, spec.name, 32)  # what convert() will pack
    assert torch.equal(scales, kernel_scales) and torch.equal(fq.export(w)["zero_points"], kernel_zps)
    # ordinary groups keep the plain quotient bit for bit (what the kernels compute)
    ordinary = w[1, :32]
    lo, hi = ordinary.min().clamp(max=0), ordinary.max().clamp(min=0)
    assert scales[1, 0] == (hi - lo) / spec.scale_divisor
