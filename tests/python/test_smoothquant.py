"""SmoothQuant: the smoothing factors, outlier channels that break naive W8A8 and that
smoothing recovers, folding into LayerNorm / RMSNorm / Linear where (and only where) exact,
and the alpha search."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from conftest import sqnr_db
from tensorslim.quantization.smoothquant import quantized_output_mse, search_alpha, smooth_factors


class OutlierBlock(nn.Module):
    """norm -> fc1 -> GELU -> fc2, with a few norm channels 150x larger than the rest (and
    weights that make up for it), as in the activations of large transformers that
    SmoothQuant addresses."""

    def __init__(self, d=256, hidden=512, residual=False):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)
        self.residual = residual
        with torch.no_grad():
            self.norm.weight[:4] = 150.0
            self.fc1.weight[:, :4] /= 150.0  # the outliers carry no more signal than other channels

    def forward(self, x):
        h = self.norm(x)
        y = self.fc2(self.act(self.fc1(h)))
        return h + y if self.residual else y


def _data(n=4, seed=0, d=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, d, generator=g) for _ in range(n)]


def _quantized(model, cfg, data):
    q = copy.deepcopy(model)
    ts.quantize(q, cfg, calib_data=data, progress=False)
    return q


def test_smooth_factors_formula():
    xa = torch.tensor([8.0, 1.0, 0.0, 2.0])
    wa = torch.tensor([0.5, 2.0, 1.0, 0.0])
    s = smooth_factors(xa, wa, 0.75)
    want = torch.tensor([8.0 ** 0.75 / 0.5 ** 0.25, 1.0 / 2.0 ** 0.25, 1.0, 1.0])  # zero channels: s = 1
    assert torch.allclose(s, want, rtol=1e-6)


def test_naive_w8a8_fails_on_outlier_channels_and_smoothquant_recovers():
    torch.manual_seed(0)
    model = OutlierBlock().eval()
    data = _data()
    test = _data(1, seed=7)[0]
    with torch.no_grad():
        ref = model(test)
        naive = sqnr_db(ref, _quantized(model, ts.W8A8(smoothquant=False), data)(test))
        smooth_q = _quantized(model, ts.W8A8(), data)
        smooth = sqnr_db(ref, smooth_q(test))
        auto = sqnr_db(ref, _quantized(model, ts.W8A8(smoothquant_alpha="auto", alpha_grid_step=0.1), data)(test))
    # Per-tensor INT8 over a range set by 4 outlier channels leaves the other 252 with a few
    # levels: ~14 dB. Smoothing moves the outliers into fc1's weights: > 30 dB.
    assert naive < 20.0, naive
    assert smooth > 30.0 and smooth > naive + 12, (naive, smooth)
    # The per-layer search (scored on held-out sample rows) does at least as well as 0.5
    # (measured: 36.6 dB vs 34.7 dB).
    assert auto >= smooth - 1.0, (auto, smooth)
    # fc1 reads the norm's output only: the smoothing went into the norm. fc2 reads GELU's output.
    assert smooth_q.fc1.smooth.startswith("folded(norm)") and smooth_q.fc1.inv_smooth is None
    assert smooth_q.fc2.smooth.startswith("input") and smooth_q.fc2.inv_smooth is not None
    assert not torch.equal(smooth_q.norm.weight, model.norm.weight)
    text = str(ts.summary(smooth_q))
    assert "smooth:folded(norm)" in text and "smooth:input" in text


def test_residual_use_prevents_folding():
    torch.manual_seed(0)
    model = OutlierBlock(residual=True).eval()  # the norm's output also feeds the residual add
    data = _data()
    q = _quantized(model, ts.W8A8(), data)
    assert q.fc1.smooth.startswith("input") and q.fc1.inv_smooth is not None
    assert torch.equal(q.norm.weight, model.norm.weight)  # left alone
    test = _data(1, seed=7)[0]
    with torch.no_grad():
        assert sqnr_db(model(test), q(test)) > 30.0


def test_fold_into_a_preceding_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32)).eval()
    with torch.no_grad():
        model[0].weight[:3] *= 40  # outlier output channels of layer 0 = input channels of layer 1
        model[0].bias[:3] *= 40
    data = [torch.randn(32, 64) for _ in range(3)]
    q = _quantized(model, ts.Int8Dynamic(smoothquant=True), data)
    assert q[1].smooth.startswith("folded(0)") and q[1].inv_smooth is None
    assert q[0].smooth.startswith("input")  # layer 0's input comes from outside the model
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 30.0


def test_llama_block_folds_into_rmsnorms():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # trained LLaMAs have outlier channels in the norms
            layer.input_layernorm.weight[:2] = 30.0
            layer.post_attention_layernorm.weight[5:7] = 30.0
    data = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    q = _quantized(model, ts.W8A8(), data)
    for i in range(2):
        pre = f"model.layers.{i}"
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert q.get_submodule(f"{pre}.{proj}").smooth.startswith(f"folded({pre}.input_layernorm)"), proj
        for proj in ("mlp.gate_proj", "mlp.up_proj"):
            assert q.get_submodule(f"{pre}.{proj}").smooth.startswith(f"folded({pre}.post_attention_layernorm)")
        assert q.get_submodule(f"{pre}.self_attn.o_proj").smooth.startswith("input")
        assert q.get_submodule(f"{pre}.mlp.down_proj").smooth.startswith("input")
    assert type(q.lm_head) is nn.Linear  # output head skipped
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        assert sqnr_db(model(ids).logits, q(ids).logits) > 20.0


def test_alpha_search_picks_the_grid_minimum_and_matches_the_kernels():
    torch.manual_seed(0)
    model = OutlierBlock().eval()
    x = torch.cat([model.norm(d).reshape(-1, 256) for d in _data()]).detach()
    w = model.fc1.weight.detach()
    x_min, x_max = x.amin(0), x.amax(0)
    best, errors = search_alpha(x, [w], x_min, x_max, "static")
    assert errors[best] == min(errors.values()) and errors[best] <= errors[0.5]
    # The search's simulation of W8A8 agrees with what Int8Linear computes.
    s = smooth_factors(torch.maximum(-x_min, x_max), w.abs().amax(0), best)
    lo, hi = float((x_min / s).min()), float((x_max / s).max())
    scale, zp = ts.quantization.observers.qparams_from_range(torch.tensor(lo), torch.tensor(hi), False)
    layer = ts.Int8Linear.from_float(w * s, None, "static", inv_smooth=1 / s, act_scale=float(scale),
                                     act_zero_point=int(zp))
    with torch.no_grad():
        real = float(((x @ w.T - layer(x)) ** 2).mean())
    sim = quantized_output_mse(x, [w], s, "static", x_min, x_max)
    assert abs(real - sim) <= 0.05 * sim, (real, sim)
