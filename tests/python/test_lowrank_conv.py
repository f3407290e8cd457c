"""ts.factorize with ts.Tucker / ts.CP on nn.Conv2d: the factorized modules compute exactly the
conv of their reconstructed kernel (any stride / padding / dilation), Tucker-2 matches the
float64 HOSVD reference, unsupported convs are skipped with the reason, bad ranks change
nothing, save/load, and the digits ResNet keeps its accuracy after a short fine-tune."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.eval import digits_basic_resnet
from tensorslim.ops import lowrank as L


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv_net(seed=0, **conv_kwargs):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(24, 32, 3, **conv_kwargs), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))


def same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


GEOMETRIES = [dict(), dict(stride=2, padding=1), dict(padding=(2, 1), dilation=(2, 1)),
              dict(padding="same"), dict(stride=(1, 2), padding=1, bias=False)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("config", [ts.Tucker(ranks=(12, 10)), ts.CP(rank=12, iters=10)],
                         ids=["tucker", "cp"])
def test_factorized_conv_computes_the_conv_of_its_kernel(geometry, config):
    model = conv_net(**geometry)
    dense = copy.deepcopy(model[0])
    report = ts.factorize(model, config, progress=False)
    new = model[0]
    assert "0" in {r.name for r in report.changed}
    assert (new.in_channels, new.out_channels, new.kernel_size) == (24, 32, (3, 3))
    assert new.stride == dense.stride and new.padding == dense.padding and new.groups == 1
    x = torch.randn(2, 24, 11, 10)
    expect = F.conv2d(x, new.weight, dense.bias, dense.stride, dense.padding, dense.dilation)
    out = new(x)
    assert out.shape == dense(x).shape
    assert torch.allclose(out, expect, atol=1e-4)
    rel = float((new.weight - dense.weight).detach().norm() / dense.weight.detach().norm())
    assert abs(rel - new.stats["rel_error"]) < 1e-4


def test_tucker_matches_the_float64_reference_and_full_rank_is_exact():
    model = conv_net()
    w = model[0].weight.detach().clone()
    ts.factorize(model, ts.Tucker(ranks=(12, 10), als_sweeps=2), progress=False)
    ref = L.tucker2_reference(w, 12, 10, 2)
    rec = torch.einsum("rshw,or,is->oihw", ref.core, ref.u_out, ref.u_in)
    assert torch.allclose(model[0].weight, rec, atol=1e-4)
    assert abs(model[0].stats["rel_error"] - ref.rel_error) < 1e-5
    # Full ranks cost more, so force the comparison through the op: exact reconstruction.
    full = L.tucker2(w, 32, 24, 0)
    assert full.rel_error < 1e-5


def test_energy_and_flop_ratio_selection():
    model = conv_net()
    ts.factorize(model, ts.Tucker(ratio=0.5), progress=False)
    for i in (0, 2):
        st = model[i].stats
        assert st["flops_after"] <= 0.5 * st["flops_before"]
    model = conv_net()
    w = model[0].weight.detach()
    s_out = torch.linalg.svdvals(w.double().flatten(1))
    expect = int(((torch.cumsum(s_out ** 2, 0) / (s_out ** 2).sum()) < 0.8).sum()) + 1
    ts.factorize(model, ts.Tucker(energy=0.8), progress=False)
    assert model[0].ranks[0] == expect


def test_unsupported_and_costly_convs_are_skipped_with_reasons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 32, 3, groups=4),
                          nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), nn.Conv1d(4, 4, 3))
    with pytest.warns(UserWarning, match="nothing was compressed"):
        report = ts.factorize(model, ts.CP(rank=8), progress=False)
    reasons = {r.name: r.reason for r in report.skipped}
    assert "factorizing would cost more" in reasons["0"]
    assert "depthwise conv (groups=16)" in reasons["1"]
    assert "grouped conv (groups=4)" in reasons["2"]
    assert "padding_mode='reflect'" in reasons["3"]
    assert "not supported" in reasons["4"]
    report = ts.factorize(model, ts.Tucker(ranks=4), progress=False)
    assert "3" in [r.name for r in report.changed]  # Tucker keeps the padding mode in its core
    x = torch.randn(1, 16, 9, 9)
    assert torch.allclose(model[3](x), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), model[3].weight,
                                                model[3].bias), atol=1e-4)


def test_ranks_beyond_the_channels_are_an_error_and_change_nothing():
    model = conv_net()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"ranks \(40, 8\) exceed the channels \(out=32, in=24\) of layer '0'"):
        ts.factorize(model, ts.Tucker(ranks=(40, 8)), progress=False)
    assert same_params(model, before)
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer '2'.*NaN or Inf"):
        ts.factorize(model, ts.CP(rank=4), progress=False)
    assert isinstance(model[0], nn.Conv2d)


@pytest.mark.parametrize("config", [ts.Tucker(ranks=(8, 6)), ts.CP(rank=6, iters=5)], ids=["tucker", "cp"])
def test_save_load_into_the_original_architecture(tmp_path, config):
    model = conv_net(stride=2, padding=1)
    ts.factorize(model, config, progress=False)
    path = tmp_path / "conv.slim.safetensors"
    ts.save(model, path)
    fresh = conv_net(seed=3, stride=2, padding=1)
    ts.load(fresh, path)
    assert same_params(fresh, model)
    x = torch.randn(1, 24, 12, 12)
    assert torch.equal(fresh(x), model(x))
    wrong = conv_net(seed=3)  # stride 1: not the layer the file was made from
    with pytest.raises(ValueError, match="different layer"):
        ts.load(wrong, path)
    assert isinstance(wrong[0], nn.Conv2d)


def test_digits_resnet_tucker_keeps_accuracy_after_a_short_fine_tune():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_basic_resnet.digits_images()
    model = digits_basic_resnet.train(digits_basic_resnet.DigitsResNet(width=16, size=8), xtr, ytr, epochs=5)
    base = digits_basic_resnet.accuracy(model, xte, yte)
    assert base > 0.95
    # Stem (one input channel) and 1x1 shortcuts have little to gain and much to lose.
    report = ts.factorize(model, ts.Tucker(ratio=0.6, exclude=("stem.*", "*.shortcut.*")), progress=False)
    changed = [r for r in report.changed]
    assert len(changed) == 6
    flops = [(model.get_submodule(r.name).stats["flops_before"], model.get_submodule(r.name).stats["flops_after"])
             for r in changed]
    assert sum(a for _, a in flops) <= 0.6 * sum(b for b, _ in flops)
    after = digits_basic_resnet.accuracy(model, xte, yte)
    tuned = digits_basic_resnet.accuracy(digits_basic_resnet.train(model, xtr, ytr, epochs=2, lr=1e-3), xte, yte)
    print(f"digits ResNet: accuracy {base:.4f} dense, {after:.4f} Tucker-2 (60% FLOPs), "
          f"{tuned:.4f} after 2 fine-tune epochs")
    assert tuned >= base - 0.02


def test_a_second_factorize_names_the_factors_as_such():
    """A factorized conv's inner convs, met by a later verb that does not take convs, are
    reported as its factors (they were "Conv2d layers are not supported by this technique")."""
    import warnings

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32 * 6 * 6, 10))
    ts.factorize(m, ts.Tucker(ratio=0.5), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ts.factorize(m, ts.SVD(ratio=0.5, skip_output_head=False), progress=False)
    rows = {c.name: c for c in report.changes}
    for part in ("first", "core", "last"):
        assert rows[f"0.{part}"].action == "skipped"
        assert rows[f"0.{part}"].reason == "a factor of the already compressed layer '0' (TuckerConv2d)"
    assert rows["2"].action == "factorized"


@pytest.mark.parametrize("config", [ts.Tucker(ranks=(8, 6)), ts.CP(rank=6, iters=5)], ids=["tucker", "cp"])
def test_bias_can_be_set_and_removed_and_the_file_loads_into_the_original(tmp_path, config):
    model = conv_net(padding=1)
    ts.factorize(model, config, progress=False)
    x = torch.randn(2, 24, 10, 10)
    no_bias = model[0](x) - model[0].bias.view(1, -1, 1, 1)
    model[0].bias = None
    assert model[0].bias is None and model[0].last.bias is None
    assert torch.allclose(model[0](x), no_bias, atol=1e-5)
    with pytest.raises(ValueError, match=r"bias: expected shape \(16,\)"):
        model[2].bias = nn.Parameter(torch.zeros(32))
    path = tmp_path / "conv.slim.safetensors"
    ts.save(model, path)
    fresh = ts.load(conv_net(seed=3, padding=1), path)  # its conv still has a bias
    assert fresh[0].bias is None and same_params(fresh, model)
    assert torch.equal(fresh(x), model(x))
    # quantized factors keep their own geometry, which must follow too (the file did not load)
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    assert type(model[2].last).__name__ == "Int8Conv2d"
    del model[2].bias
    ts.save(model, path)
    fresh = ts.load(conv_net(seed=3, padding=1), path)
    assert fresh[2].bias is None and torch.equal(fresh(x), model(x))
