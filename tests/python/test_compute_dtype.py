"""model.half() / .bfloat16() / .to(dtype) / .float() after compression: every kind changes its
compute dtype (inputs and outputs in it) and keeps its packed codes, scales and bias as they
were; float64 raises at the call, never at the next forward."""
import pytest
import torch
from torch import nn

import tensorslim as ts

from compressed_kinds import IN, KINDS, OUT, QUANTIZED_ACTIVATIONS, build

# Relative error (norm of the difference over norm of the fp32 output) of a half-precision
# forward of LayerNorm -> compressed layer -> GELU -> Linear against the fp32 one. Input and
# output roundings are 2^-11 (fp16) and 2^-8 (bf16) relative per element; kinds that quantize
# activations also move some activation codes by one step where the rounded input crosses a
# rounding boundary. Worst seen over 4 seeds: weight-only 5.9e-4 (fp16) / 5.3e-3 (bf16),
# activation-quantizing 2.8e-3 / 8.3e-3; the bounds are about 3x those.
REL_TOL = {(False, torch.float16): 2e-3, (False, torch.bfloat16): 1.6e-2,
           (True, torch.float16): 8e-3, (True, torch.bfloat16): 2.5e-2}


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(KINDS))
@torch.no_grad()
def test_half_model_forward_matches_fp32(kind, dtype):
    layer = build(kind)
    model = nn.Sequential(nn.LayerNorm(IN), layer, nn.GELU(), nn.Linear(OUT, 8))
    x = torch.randn(5, 3, IN, generator=torch.Generator().manual_seed(2))
    ref, ref_layer = model(x), layer(x)
    before = _state(layer)
    assert (model.half() if dtype == torch.float16 else model.to(dtype)) is model
    assert layer.compute_dtype == dtype and layer.weight.dtype == dtype
    for k, v in layer.state_dict().items():  # packed weights and scales untouched
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    y = model(x.to(dtype))
    assert y.dtype == dtype
    rel = float((y.float() - ref).norm() / ref.norm())
    assert rel < REL_TOL[kind in QUANTIZED_ACTIVATIONS, dtype], rel
    model.float()  # the float layers lost precision; the compressed one computes as before
    assert layer.compute_dtype == torch.float32
    assert torch.equal(layer(x), ref_layer)


@pytest.mark.parametrize("kind", ["int4_g32", "nvfp4", "w8a8_static", "xnor"])
def test_inputs_are_cast_to_the_compute_dtype(kind):
    layer = build(kind).bfloat16()
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(3))
    y = layer(x)  # a float32 input to a bf16 layer: computed in bf16, as the layer's dtype says
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x.bfloat16()))


def test_default_layer_follows_the_input_dtype():
    """Until a dtype is set, a layer keeps an input's own float dtype (as before)."""
    layer = build("int4_g32")
    x = torch.randn(4, IN)
    assert layer(x.half()).dtype == torch.float16
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("kind", ["int8_weight_only", "mxfp4", "w4a8", "ternary"])
def test_float64_raises_at_the_call(kind):
    layer = build(kind)
    before = _state(layer)
    with pytest.raises(TypeError, match="cannot compute in torch.float64"):
        layer.double()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer.to(torch.float64)
    assert layer.compute_dtype == torch.float32
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in layer.state_dict().items())


def test_device_moves_keep_the_compute_dtype():
    layer = build("int4_g32").half()
    layer.to("cpu")
    layer.cpu()
    assert layer.compute_dtype == torch.float16
    layer.to("cpu", torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16


def test_half_model_with_gradients_to_the_input():
    """Adapters on a half-precision quantized base: backward reaches the input in its dtype."""
    layer = build("int4_g32").half()
    x = torch.randn(3, IN, dtype=torch.float16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.dtype == torch.float16
    ref = torch.ones(3, OUT, dtype=torch.float64) @ layer.effective_weight().double()
    assert torch.allclose(x.grad.double(), ref, rtol=2e-3, atol=1e-3)



@pytest.mark.parametrize("cfg", [ts.Int8WeightOnly(), ts.Int4WeightOnly(group_size=32, algorithm="gptq"), ts.W8A8()],
                         ids=["int8", "gptq", "w8a8"])
def test_a_half_model_compressed_in_memory_computes_as_its_loaded_copy(cfg, tmp_path):
    """Compressed layers of a bf16 model compute in bf16 right after the verb, as the same model
    loaded from its file does (they computed in float32 until saved and loaded)."""
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))

    model = mlp().to(torch.bfloat16)
    calib = [torch.randn(16, 64).to(torch.bfloat16) for _ in range(2)]
    ts.quantize(model, cfg, calib_data=calib, progress=False)
    ts.save(model, tmp_path / "m.safetensors")
    loaded = mlp().to(torch.bfloat16)
    ts.load(loaded, tmp_path / "m.safetensors")
    for a, b in zip(model, loaded):
        if isinstance(a, ts.nn.CompressedLinear):
            assert a.compute_dtype == b.compute_dtype == torch.bfloat16
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x)) and model(x).dtype == torch.bfloat16
