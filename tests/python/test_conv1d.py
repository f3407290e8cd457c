"""transformers' Conv1D (GPT-2: y = x @ W + b, W [in, out]) is handled as the nn.Linear it is
(weight W.T) by every recipe. The check: a tiny GPT-2 quantized with a recipe gives the same
output, bit for bit, as the same GPT-2 with its Conv1D layers first rewritten by hand as
nn.Linear and quantized with that recipe; skipped Conv1D layers stay Conv1D."""
import warnings

import pytest
import torch
from torch import nn

import tensorslim as ts

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402
from tiny_gpt2 import CALIB, IDS, linear_twin, tiny_gpt2  # noqa: E402

N_CONV1D = 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)

RECIPES = {
    "int8": lambda: ts.Int8WeightOnly(),
    "int4_g32": lambda: ts.Int4WeightOnly(group_size=32),
    "uint3_g32": lambda: ts.IntWeightOnly(bits=3, group_size=32, symmetric=False),
    "fp8": lambda: ts.FP8WeightOnly(),
    "nvfp4": lambda: ts.NVFP4(),
    "mxfp4": lambda: ts.MXFP4(),
    "w8a8": lambda: ts.W8A8(smoothquant=False),
    "w8a8_smoothquant": lambda: ts.W8A8(smoothquant_alpha=0.5),
    "int8_dynamic": lambda: ts.Int8Dynamic(),
    "w4a8": lambda: ts.W4A8(group_size=32),
    "binary": lambda: ts.Binary(),
    "xnor": lambda: ts.Binary(activations=True),
    "ternary": lambda: ts.Ternary(),
    "awq": lambda: ts.AWQ(group_size=32, n_grid=4),
    "gptq": lambda: ts.GPTQ(group_size=32),
}




@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_quantizes_conv1d_as_linear(recipe):
    model = tiny_gpt2()
    twin = linear_twin(model)
    report = ts.quantize(model, RECIPES[recipe](), calib_data=CALIB, progress=False)
    ts.quantize(twin, RECIPES[recipe](), calib_data=CALIB, progress=False)
    conv_rows = [c for c in report.changes if c.module_type == "Conv1D"]
    assert len(conv_rows) == N_CONV1D and all(c.action == "quantized" for c in conv_rows), report
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, twin(IDS).logits)


def test_qat_prepares_and_converts_conv1d():
    model = tiny_gpt2()
    twin = linear_twin(model)
    cfg = ts.Int4WeightOnly(group_size=32)
    report = ts.prepare_qat(model, cfg, progress=False)
    ts.prepare_qat(twin, cfg, progress=False)
    assert sum(c.module_type == "Conv1D" and c.action != "skipped" for c in report.changes) == N_CONV1D
    ts.convert(model)
    ts.convert(twin)
    assert sum(isinstance(m, ts.WeightOnlyLinear) for m in model.modules()) == N_CONV1D
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, twin(IDS).logits)


def test_skipped_conv1d_stay_conv1d_with_their_weights():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = ts.quantize(model, ts.Int4WeightOnly(group_size=32, exclude=["*.mlp.*"]), progress=False)
    skipped = {c.name for c in report.skipped if c.module_type == "Conv1D"}
    assert skipped == {f"transformer.h.{i}.mlp.{n}" for i in (0, 1) for n in ("c_fc", "c_proj")}
    for name in skipped:
        mod = model.get_submodule(name)
        assert type(mod) is Conv1D
        assert torch.equal(mod.weight, before[name + ".weight"]) and torch.equal(mod.bias, before[name + ".bias"])


def test_a_failed_transform_leaves_conv1d_in_place():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="mlp.c_proj"):
        ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert sum(type(m) is Conv1D for m in model.modules()) == N_CONV1D
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)


def test_excluded_conv1d_stays_while_smoothquant_runs_elsewhere():
    model = tiny_gpt2()
    twin = linear_twin(model)
    cfg = ts.W8A8(smoothquant_alpha=0.5, exclude=["*.c_fc"])
    ts.quantize(model, cfg, calib_data=CALIB, progress=False)
    ts.quantize(twin, cfg, calib_data=CALIB, progress=False)
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D
    with torch.no_grad():  # Conv1D's addmm and Linear's matmul may round differently
        assert torch.allclose(model(IDS).logits, twin(IDS).logits, rtol=1e-5, atol=1e-5)


def test_fold_into_a_skipped_conv1d_lands_in_its_weight():
    """SmoothQuant folds 1/s into a producer it does not quantize; for a Conv1D producer the
    fold is carried back into the Conv1D's own [in, out] weight and bias."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(32, 16), Conv1D(8, 32))  # Conv1D(out, in)
    ref_w = model[0].weight.detach().clone()
    x = [torch.randn(4, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    ref = model(x[0]).detach()
    ts.quantize(model, ts.W8A8(smoothquant_alpha=0.5, exclude=["0"]), calib_data=x, progress=False)
    assert type(model[0]) is Conv1D and isinstance(model[1], ts.Int8Linear)
    assert model[1].inv_smooth is None  # folded, not kept in the module
    assert not torch.equal(model[0].weight, ref_w)
    out = model(x[0]).detach()
    assert float((out - ref).norm() / ref.norm()) < 2e-2


def test_factorize_svd_takes_conv1d():
    model = tiny_gpt2()
    report = ts.factorize(model, ts.SVD(rank=8), progress=False)
    assert sum(c.module_type == "Conv1D" and c.action == "factorized" for c in report.changes) == N_CONV1D


@pytest.mark.parametrize("verb", ["quantize", "factorize", "prune"])
def test_nothing_compressed_warns(verb):
    # layers none of these handle (embedding tables are quantized by the weight-only recipes)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 1))
    with pytest.warns(UserWarning, match="nothing was compressed") as caught:
        if verb == "quantize":
            ts.quantize(model, ts.Int8WeightOnly(), progress=False)
        elif verb == "factorize":
            ts.factorize(model, ts.SVD(rank=2), progress=False)
        else:
            ts.prune(model, ts.Magnitude(sparsity=0.5, include=["nothing.*"]), progress=False)
    assert any(f"ts.{verb}: nothing was compressed" in str(w.message) for w in caught)


def test_something_compressed_does_not_warn():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(3, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ts.quantize(model, ts.Int8WeightOnly(), progress=False)
