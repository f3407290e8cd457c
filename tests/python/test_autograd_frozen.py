"""Backward through a frozen compressed layer to its input: grad_x = grad_y @ W_eff for every
kind (straight through activation quantization), no gradient to the packed buffers, an
adapter on a quantized base trains, and inference is unchanged."""
import pytest
import torch
from torch import nn

import tensorslim as ts
from compressed_kinds import IN, KINDS, OUT, build, weight_in_original_domain


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_input_gradient_is_grad_y_times_dequantized_weight(kind):
    layer = build(kind)
    torch.manual_seed(1)
    x = torch.randn(3, 5, IN, requires_grad=True)
    y = layer(x)
    assert y.requires_grad and y.grad_fn is not None
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref = grad_y.double() @ weight_in_original_domain(layer)
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
    assert torch.allclose(x.grad.double(), ref, rtol=1e-5, atol=1e-5)
    assert list(layer.parameters()) == []
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())


@pytest.mark.parametrize("kind", ["int4_g32", "nvfp4", "w8a8_static", "binary"])
def test_bfloat16_input_gets_a_bfloat16_gradient(kind):
    layer = build(kind)
    x = torch.randn(4, IN).to(torch.bfloat16).requires_grad_()
    layer(x).float().sum().backward()
    ref = torch.ones(4, OUT, dtype=torch.float64) @ weight_in_original_domain(layer)
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_inference_is_unchanged(kind):
    layer = build(kind)
    x = torch.randn(6, IN)
    plain = layer(x)  # x does not require grad: the kernel alone, no graph
    assert not plain.requires_grad and plain.grad_fn is None
    with torch.no_grad():
        assert torch.equal(layer(x.clone().requires_grad_()), plain)
    with torch.inference_mode():
        assert torch.equal(layer(x), plain)
    assert torch.equal(layer(x.clone().requires_grad_()).detach(), plain)


class LoRA(nn.Module):
    """A rank-r adapter beside a frozen (here: quantized) layer, B zero-initialized."""

    def __init__(self, base: nn.Module, rank: int = 4):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T


@pytest.mark.parametrize("config", [ts.Int4WeightOnly(group_size=32), "w8a8", "nvfp4", "xnor",
                                    ts.W4A8(group_size=32), "int8_dynamic"],
                         ids=["int4_g32", "w8a8", "nvfp4", "xnor", "w4a8", "int8_dynamic"])
def test_lora_on_a_quantized_base_trains(config):
    """Adapters on both layers: the first one's gradient passes through the second,
    quantized layer to reach it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))
    data = [torch.randn(32, 128) for _ in range(2)]
    ts.quantize(model, config, calib_data=data, progress=False)
    assert all(isinstance(model[i], ts.nn.CompressedLinear) for i in (0, 2))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model[0], model[2] = LoRA(model[0]), LoRA(model[2])
    x, target = torch.randn(64, 128), torch.randn(64, 16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model[0].a.grad is not None and float(model[0].a.grad.abs().sum()) > 0
    assert losses[-1] < 0.8 * losses[0]
    after = {k.replace(".base", ""): v for k, v in model.state_dict().items() if ".base." in k}
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("as_parameter", [False, True], ids=["buffer", "parameter"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x_plain", "x_grad"])
def test_a_bias_made_trainable_gets_its_gradient(kind, as_parameter, x_grad):
    """BitFit on a compressed model: a bias buffer set requires_grad (or re-set as a
    Parameter) gets sum(grad_y) over the rows; it got None, silently, before."""
    layer = build(kind)
    if layer.bias is None:
        pytest.skip("no bias")
    if as_parameter:
        layer.bias = nn.Parameter(layer.bias.detach().clone())
    else:
        layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, IN, requires_grad=x_grad)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert layer.bias.grad is not None
    assert torch.allclose(layer.bias.grad.double(), grad_y.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    if x_grad:
        assert torch.allclose(x.grad.double(), grad_y.double() @ weight_in_original_domain(layer),
                              rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient wanted: the plain kernel, the same values
        assert torch.equal(layer(x.detach()), y.detach())


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("as_parameter", [False, True], ids=["buffer", "parameter"])
def test_int8_conv_trainable_bias_gets_its_gradient(mode, as_parameter):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    ts.quantize(model, ts.W8A8() if mode == "static" else ts.Int8Dynamic(), calib_data=data, progress=False)
    conv = model[0]
    assert isinstance(conv, ts.nn.Int8Conv2d)
    if as_parameter:  # the static plan read the bias from the buffers (KeyError)
        conv.bias = nn.Parameter(conv.bias.detach().clone())
    else:
        conv.bias.requires_grad_(True)
    with torch.no_grad():
        plain = model(data[0])
    y = model(data[0])
    assert torch.equal(y.detach(), plain)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    relu_open = (y > 0).double()  # the ReLU after the conv passes the gradient where y > 0
    want = (grad_y.double() * relu_open).sum((0, 2, 3))
    assert conv.bias.grad is not None
    assert torch.allclose(conv.bias.grad.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_torch_func_grad_through_a_compressed_layer(kind):
    """torch.func.grad / jacrev take the layer (its autograd.Function has setup_context), and a
    transform whose gradient does not cross it runs its kernel on unwrapped tensors."""
    layer = build(kind)
    w = weight_in_original_domain(layer)
    x = torch.randn(IN)
    g = torch.func.grad(lambda t: layer(t).sum())(x)
    assert torch.allclose(g.double(), w.sum(0), rtol=1e-5, atol=1e-5)
    # Forward mode gave zero tangents silently (the kernel ran outside any autograd.Function).
    assert torch.allclose(torch.func.jacfwd(layer)(x).double(), w, rtol=1e-5, atol=1e-5)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(torch.randn(3, IN), torch.ones(3, IN))
        tangent = torch.autograd.forward_ad.unpack_dual(layer(dual)).tangent
    assert tangent is not None and torch.allclose(tangent.double(), w.sum(1).expand(3, -1), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="batching rule"):  # per-sample gradients: torch's batching fallback
        per_sample = torch.func.vmap(torch.func.grad(lambda t: layer(t).sum()))(torch.randn(4, IN))
    assert torch.allclose(per_sample.double(), w.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)
    head = nn.Linear(OUT, 2)
    params = {k: v.detach() for k, v in head.named_parameters()}
    feats = layer(x.unsqueeze(0))
    grads = torch.func.grad(lambda p: torch.func.functional_call(head, p, (layer(x.unsqueeze(0)),)).sum())(params)
    assert torch.allclose(grads["weight"], feats.expand(2, -1), rtol=1e-6, atol=1e-6)


def test_int8_conv_under_torch_func_and_forward_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    conv = model[0]
    x = torch.randn(1, 3, 5, 5)
    want = torch.nn.functional.conv2d(torch.ones_like(x), conv.weight, padding=1)  # a ones direction
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(conv(dual)).tangent
    assert tangent is not None and torch.allclose(tangent, want, atol=1e-5)
    g = torch.func.grad(lambda t: conv(t).sum())(x)
    ref = torch.nn.grad.conv2d_input(x.shape, conv.weight, torch.ones(1, 4, 5, 5), padding=1)
    assert torch.allclose(g, ref, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("shape", [(16, IN), (2, 8, IN)], ids=["2d", "3d"])
def test_in_place_ops_on_the_output_while_training(kind, shape):
    """nn.ReLU(inplace=True) or a masked write on a compressed layer's output with autograd on:
    the output was a view a custom Function returned, which autograd refuses to modify."""
    layer = build(kind)
    torch.manual_seed(2)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        ref = layer(x.detach()).relu()
    y[..., 0] = 0.0  # masked / indexed writes, as wav2vec2's feature masking does
    torch.relu_(y)
    ref[..., 0] = 0.0
    assert torch.equal(y.detach(), ref)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    open_ = (ref > 0).double()
    want = (grad_y.double() * open_) @ weight_in_original_domain(layer)
    assert torch.allclose(x.grad.double(), want, rtol=1e-5, atol=1e-5)


def test_in_place_relu_after_an_int8_conv_while_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3))
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    ts.quantize(model, ts.Int8Dynamic(), calib_data=data, progress=False)
    assert isinstance(model[0], ts.nn.Int8Conv2d)
    x = data[0].clone().requires_grad_(True)
    with torch.no_grad():
        want = model(x.detach())
    y = model(x)
    assert torch.equal(y.detach(), want)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
