"""Every compressed linear keeps nn.Linear's surface: in_features, out_features and a
read-only `.weight` (the effective weight, computed on access), so code that reads a layer's
weight (T5's `self.wo.weight.dtype`, adapters, probes) keeps working."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.transforms import _is_weight_matrix_layer, float_weight

from compressed_kinds import IN, KINDS, OUT, build, weight_in_original_domain


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_weight_is_the_effective_weight(kind):
    layer = build(kind)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    w = layer.weight
    assert isinstance(w, torch.Tensor) and not isinstance(w, nn.Parameter)
    assert (tuple(w.shape), w.dtype, w.device) == ((OUT, IN), torch.float32, layer.bias.device)
    assert not w.requires_grad
    assert torch.equal(w.double(), weight_in_original_domain(layer).float().double())


@pytest.mark.parametrize("kind", ["int4_g32", "int4_input_scaled", "nvfp4", "binary", "w8a8_smoothed"])
def test_linear_with_weight_matches_weight_only_forward(kind):
    """F.linear(x, layer.weight, layer.bias) is what the layer computes (exactly so for the
    weight-only kinds, up to fp32 summation order; the activation-quantizing kinds add their
    input rounding, so they are only checked for the weight's scale here)."""
    layer = build(kind)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x, layer.weight, layer.bias)
    got = layer(x)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < (5e-2 if kind in ("w8a8_smoothed",) else 1e-5), rel


@pytest.mark.parametrize("kind", ["int8_weight_only", "mxfp4", "int8_dynamic", "ternary"])
def test_weight_is_read_only(kind):
    layer = build(kind)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for value in (torch.zeros(OUT, IN), nn.Parameter(torch.zeros(OUT, IN))):
        with pytest.raises(AttributeError, match="read-only"):
            layer.weight = value
    with pytest.raises(AttributeError, match="read-only"):
        del layer.weight
    for edit in (lambda w: w.zero_(), lambda w: w.copy_(torch.ones(OUT, IN)),
                 lambda w: torch.mul(torch.ones(OUT, IN), 2, out=w)):
        with pytest.raises(RuntimeError, match="read-only"):  # it would edit a copy only
            edit(layer.weight)
    layer.weight.clone().zero_()  # a copy of the values is the caller's own
    trained = nn.Parameter(layer.weight)  # trains in its computed values (an optimizer's add_)
    with torch.no_grad():
        trained.add_(1.0)
    assert torch.equal(trained, layer.weight + 1.0)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_weight_follows_device_dtype_and_meta():
    layer = build("int4_g32")
    assert layer.to(torch.bfloat16).weight.dtype == torch.bfloat16
    assert layer.float().weight.dtype == torch.float32
    meta = layer.to("meta")
    assert meta.weight.device.type == "meta" and tuple(meta.weight.shape) == (OUT, IN)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_model_code_calling_f_linear_on_a_half_layer(kind, dtype):
    """Code computing F.linear(x, layer.weight, layer.bias) itself after model.half() got a
    float32 bias beside half tensors ("self and mat2 must have the same dtype"): `.bias` is in
    the compute dtype too, while the stored float32 bias the kernels read is unchanged."""
    layer = build(kind)
    if layer.bias is None:
        pytest.skip("no bias")
    stored = layer.bias.clone()
    layer.to(dtype)
    assert layer.bias.dtype == dtype and torch.equal(layer.bias.float(), stored.to(dtype).float())
    x = torch.randn(3, IN, dtype=dtype, generator=torch.Generator().manual_seed(2))
    want = F.linear(x.float(), layer.weight.float(), stored)
    got = F.linear(x, layer.weight, layer.bias)
    assert got.dtype == dtype and float((got.float() - want).norm() / want.norm()) < 2e-2
    assert layer.float().bias.dtype == torch.float32 and torch.equal(layer.bias, stored)  # not rounded


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_half_bias_copy_is_read_only_and_trains_the_stored_bias(kind):
    """In a bf16 layer `.bias` is a computed copy: an in-place edit raises (it changed nothing
    before), requires_grad_ makes the stored float32 bias train (BitFit), and a bias set back
    in bf16 (layer.bias = nn.Parameter(layer.bias.detach())) runs, added in float32."""
    layer = build(kind)
    if layer.bias is None:
        pytest.skip("no bias")
    stored = layer.bias
    layer.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="read-only"):
        with torch.no_grad():
            layer.bias.zero_()
    x = torch.randn(2, IN, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    want = layer(x)
    assert layer.bias.requires_grad_(True) is stored  # SGD([layer.bias.requires_grad_()]) trains it
    assert layer.bias is stored and stored.dtype == torch.float32 and stored.requires_grad
    layer(x).float().sum().backward()
    assert stored.grad is not None and torch.allclose(stored.grad, torch.full((OUT,), 2.0))
    stored.requires_grad_(False)
    layer.bias = nn.Parameter(stored.detach().to(torch.bfloat16))
    torch.testing.assert_close(layer(x).float(), want.float(), atol=0.05, rtol=0.02)


def test_a_trainable_bias_of_a_half_layer_is_itself():
    """A bias re-set as a Parameter is returned itself in a bf16 layer (a cast copy would
    take the gradient and the optimizer step away from it)."""
    layer = build("int8_dynamic").to(torch.bfloat16)
    layer.bias = nn.Parameter(layer.float().bias.detach().clone())
    layer.to(torch.bfloat16)
    assert isinstance(layer.bias, nn.Parameter) and layer.bias.dtype == torch.float32
    layer(torch.randn(2, IN, dtype=torch.bfloat16)).float().sum().backward()
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, torch.full((OUT,), 2.0))


def test_compressed_layers_are_not_float_layers():
    """Code asking "is this a float layer with a weight to edit" does not take a compressed
    layer for one (its `.weight` is computed, not a parameter)."""
    for kind in ("int4_g32", "w8a8_static", "xnor"):
        layer = build(kind)
        assert float_weight(layer) is None and not _is_weight_matrix_layer(layer)
    lin = nn.Linear(4, 3)
    assert float_weight(lin) is lin.weight and _is_weight_matrix_layer(lin)


def test_quantizing_again_reports_already_compressed_not_unsupported():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 16))
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    with pytest.warns(UserWarning, match="nothing was compressed"):
        again = ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    assert sorted(c.name for c in again.skipped) == ["0", "2"]
    assert all("already compressed" in c.reason for c in again.skipped)


def test_t5_runs_after_quantization():
    """T5's feed-forward reads `self.wo.weight.dtype` on every call."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    torch.set_grad_enabled(False)
    try:
        _check_t5(model, ids)
    finally:
        torch.set_grad_enabled(True)


def _check_t5(model, ids):
    ref = model(input_ids=ids, decoder_input_ids=ids).logits
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert any(c.name.endswith("DenseReluDense.wo") for c in report.changed)
    out = model(input_ids=ids, decoder_input_ids=ids).logits
    assert float((out - ref).norm() / ref.norm()) < 2e-2


def _count_dequantizations(monkeypatch, cls, method):
    calls = []
    real = getattr(cls, method)

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, method, spy)
    return calls


@pytest.mark.parametrize("kind", ["int4_g32", "int8_dynamic", "nvfp4", "sparse_csr_90"])
def test_reading_the_weights_metadata_dequantizes_nothing(kind, monkeypatch):
    """T5 compares `wo.weight.dtype` twice per layer and forward: each read used to dequantize
    the whole matrix. The values are computed on first use, once per `.weight` object."""
    layer = build(kind)
    calls = _count_dequantizations(monkeypatch, type(layer), "effective_weight")
    w = layer.weight
    assert (w.dtype, tuple(w.shape), w.device.type, w.dim(), w.numel()) == (torch.float32, (OUT, IN), "cpu", 2,
                                                                           OUT * IN)
    assert calls == []
    want = weight_in_original_domain(layer).float()
    assert torch.equal(w * 1, want) and torch.equal(w.T, want.T) and type(w * 1) is torch.Tensor
    assert torch.equal(torch.from_numpy(w.numpy()), want) and len(calls) == 1
    assert type(w.clone()) is torch.Tensor


def test_embedding_and_conv_weights_are_lazy_too(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32))
    ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    table = model[0]
    calls = _count_dequantizations(monkeypatch, type(table), "_rows")
    assert table.weight.shape[0] == 50 and calls == []
    assert torch.equal(table.weight[torch.tensor([3, 7])], table(torch.tensor([3, 7])))
    held = table.weight
    model.half()  # a weight read before a dtype change keeps the dtype it announced
    assert held.dtype == torch.float32 and (held + 0).dtype == torch.float32
    assert table.weight.dtype == torch.float16 and (table.weight + 0).dtype == torch.float16
    model.float()
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    ts.quantize(conv, ts.Int8Dynamic(), calib_data=[torch.randn(1, 3, 8, 8)], progress=False)
    w = conv[0].weight
    assert w.dtype == torch.float32 and tuple(w.shape) == (8, 3, 3, 3)
    assert torch.equal(w + 0, conv[0].qweight.float() * conv[0].w_scales.reshape(-1, 1, 1, 1))


def test_compiled_code_reading_the_weight_gets_a_plain_tensor():
    layer = build("int4_g32")

    def f(x):
        return F.linear(x, layer.weight.to(x.dtype)) + layer.weight.sum()
    x = torch.randn(4, IN)
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x), atol=1e-5)


def test_lazy_weight_where_code_reads_storage_or_wraps_it():
    """What a plain `.weight` allowed keeps working: safetensors (reads data_ptr), shared memory,
    DLPack, nn.Parameter(layer.weight) in a float layer that then trains, deepcopy."""
    import copy

    import safetensors.torch

    layer = build("int8_weight_only")
    want = weight_in_original_domain(layer).float()
    stored = safetensors.torch.load(safetensors.torch.save({"w": layer.weight}))["w"]
    assert torch.equal(stored, want)
    w = layer.weight
    assert w.data_ptr() != 0 and w.data_ptr() == w.data_ptr()  # its computed values, kept while held
    assert torch.equal(layer.weight.share_memory_() + 0, want)
    assert torch.equal(torch.from_dlpack(layer.weight), want)
    lin = nn.Linear(IN, OUT)
    lin.weight = nn.Parameter(layer.weight)
    assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad
    x = torch.randn(4, IN)
    assert torch.allclose(lin(x), F.linear(x, want, lin.bias))
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).pow(2).sum().backward()
    opt.step()
    moved = lin.weight + 0
    assert not torch.equal(moved, want)  # the step reached the values the layer computes with
    assert torch.equal(copy.deepcopy(lin).weight, moved) and isinstance(copy.deepcopy(lin).weight, nn.Parameter)
    fresh = nn.Linear(IN, OUT)
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh.weight, moved)
