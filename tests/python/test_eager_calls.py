"""ops/_eager.py: the direct call skips torch.library's dispatcher only where it has nothing to
do. Same results both ways, and the dispatcher still sees the op under torch.compile, fake
tensors, dispatch modes and autograd."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import tensorslim as ts
from tensorslim import ops
from tensorslim.ops import _eager


def _layer():
    torch.manual_seed(0)
    return ts.nn.WeightOnlyLinear.from_linear(torch.nn.Linear(64, 48), "int4", 32, "auto")


def test_direct_and_dispatched_calls_agree_bit_for_bit():
    layer, x = _layer(), torch.randn(5, 64)
    args = (x, layer.qweight, layer.scales, None, layer.bias, "int4", 32, 0)
    assert _eager.direct_ok(args)
    direct = ops.weight_only._linear_weight_only_impl(*args)
    dispatched = ops.weight_only._linear_weight_only(*args)
    assert torch.equal(direct, dispatched)


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_still_see_the_op():
    layer, x = _layer(), torch.randn(3, 64)
    with _Seen() as seen:
        layer(x)
    assert any("tensorslim.linear_weight_only" in n for n in seen.names)


def test_gradient_to_the_input_goes_through_the_dispatcher():
    layer, x = _layer(), torch.randn(3, 64, requires_grad=True)
    assert not _eager.direct_ok((x,))
    layer(x).sum().backward()
    want = layer.dequantized_weight().sum(0).expand(3, 64)
    assert torch.allclose(x.grad, want, rtol=1e-5, atol=1e-6)


def test_fake_tensors_and_compile_take_the_op():
    layer = _layer()
    with FakeTensorMode():
        fx = torch.empty(7, 64)
        assert not _eager.direct_ok((fx,))
    compiled = torch.compile(lambda t: layer(t), backend="eager", fullgraph=True)
    x = torch.randn(4, 64)
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("config", [ts.Int4WeightOnly(group_size=32, skip_output_head=False),
                                    ts.NM(2, 4, skip_output_head=False)])
def test_export_with_a_dynamic_batch_past_the_decode_threshold(config):
    """Batches from 64 rows decode the weight for torch's GEMM in eager; traced, the op covers
    every batch: a dynamic batch across 64 failed to export, fullgraph=True failed from 64 rows
    (the fork check inside the branch is a pybind call dynamo cannot trace)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    (ts.sparsify if isinstance(config, ts.NM) else ts.quantize)(model, config, progress=False)
    batch = torch.export.Dim("b", min=2, max=200)
    exported = torch.export.export(model, (torch.randn(3, 64),), dynamic_shapes={"input": {0: batch}})
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for rows in (2, 63, 64, 200):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_sparse_linears_call_directly_and_agree():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 24))
    ts.sparsify(m, ts.NM(2, 4), progress=False)
    csr = torch.nn.Sequential(torch.nn.Linear(64, 40))
    with torch.no_grad():
        csr[0].weight.mul_(torch.rand(40, 64) > 0.8)
    ts.sparsify(csr, ts.SparseStorage(layout="csr"), progress=False)
    x = torch.randn(3, 64)
    nm, cs = m[0], csr[0]
    nm_args = (x, nm.values, nm.indices, nm.scales, nm.bias, 2, 4)
    cs_args = (x, cs.values, cs.cols, cs.row_ptr, cs.scales, cs.bias)
    assert _eager.direct_ok(nm_args) and _eager.direct_ok(cs_args)
    assert torch.equal(ops.sparse._nm_linear_impl(*nm_args), ops.sparse._nm_linear(*nm_args))
    assert torch.equal(ops.sparse._csr_linear_impl(*cs_args), ops.sparse._csr_linear(*cs_args))
    with _Seen() as seen:
        nm(x), cs(x)
    assert any("tensorslim.nm_linear" in n for n in seen.names)
    assert any("tensorslim.csr_linear" in n for n in seen.names)


def test_sparse_layers_take_the_direct_call_with_the_ops_bits():
    # The sparse layers' eager fp32 call skips the op's Python checks (nm_linear_direct /
    # csr_linear_direct); the kernel, its arguments and so the bits are the op's.
    torch.manual_seed(3)
    lin = torch.nn.Linear(96, 40)
    keep = torch.rand(40, 96) > 0.7
    nm_keep = torch.zeros(40, 24, 4, dtype=torch.bool).scatter_(-1, lin.weight.abs().reshape(40, 24, 4).topk(
        2, dim=-1).indices, True).reshape(40, 96)
    layers = [ts.nn.NMSparseLinear.from_dense(lin.weight.data, nm_keep, 2, 4, v, lin.bias.data)
              for v in ("float32", "bfloat16", "int8")]
    layers += [ts.nn.CSRSparseLinear.from_dense(lin.weight.data, keep, v, lin.bias.data) for v in ("float32", "int8")]
    for layer in layers:
        nm = isinstance(layer, ts.nn.NMSparseLinear)
        packed = ((layer.values, layer.indices, layer.scales, layer.bias) if nm else
                  (layer.values, layer.cols, layer.row_ptr, layer.scales, layer.bias))
        for shape in ((1, 96), (5, 96), (2, 3, 96), (40, 96)):
            x = torch.randn(*shape)
            with torch.no_grad():
                direct = layer(x)
            via_op = (ops.sparse.nm_linear(x, *packed, 2, 4, 96) if nm else ops.sparse.csr_linear(x, *packed, 96))
            assert direct.shape == (*shape[:-1], 40)
            assert torch.equal(direct, via_op), (layer.values_dtype, shape)
        x = torch.randn(5, 96)
        direct_fn = ((lambda x2, b: ops.sparse.nm_linear_direct(x2, *packed, 2, 4, b)) if nm else
                     (lambda x2, b: ops.sparse.csr_linear_direct(x2, *packed, b)))
        assert direct_fn(x, "auto") is not None
        # The reference backend, a strided or a bf16 input go the op's way (same results).
        assert direct_fn(x, "reference") is None
        assert direct_fn(torch.randn(96, 5).t(), "auto") is None
        assert direct_fn(x.bfloat16(), "auto") is None
        xt = torch.randn(96, 3).t()
        assert torch.equal(layer(xt), layer(xt.contiguous()))
        assert layer(x.bfloat16()).dtype == torch.bfloat16
        xg = x.clone().requires_grad_()
        layer(xg).sum().backward()  # autograd reaches the input through the op
        assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("act", [None, (0.03, 117, torch.uint8), (0.02, 0, torch.int8), (0.05, 0, torch.uint8)],
                         ids=["per-token", "static-u8-zp117", "static-s8", "static-u8-zp0"])
def test_w8a8_in_one_call_equals_its_two_ops(act):
    # linear_w8a8, eager on the CPU: one native call quantizes (per token or static) and
    # multiplies; the dispatched path runs the quantizer op then linear_int8. Same kernels,
    # same bits, and the reference's values.
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (48, 96), dtype=torch.int8)
    w_scales, bias, inv = torch.rand(48) * 0.01, torch.randn(48), torch.rand(96) + 0.5
    packed = ops.int8.pack_int8_weight(w)
    scale, zp, dtype = act or (None, 0, torch.uint8)
    for rows in (1, 20, 100):
        x = torch.randn(rows, 96)
        for smooth in (None, inv):
            fused = ops.int8.linear_w8a8(x, w, w_scales, bias, smooth, scale, zp, dtype, packed=packed)
            with _Seen() as seen:
                two = ops.int8.linear_w8a8(x, w, w_scales, bias, smooth, scale, zp, dtype, packed=packed)
            quantizer = "quantize_per_token" if act is None else "quantize_static"
            assert any(quantizer in n for n in seen.names)
            assert any("linear_int8" in n for n in seen.names)
            assert torch.equal(fused, two)
            if act is None:
                (qx, s), code_zp = ops.int8.quantize_per_token(x, smooth, unsigned=True), 128
            else:
                qx, s, code_zp = ops.int8.quantize_static(x, scale, zp, smooth, dtype), torch.tensor([scale]), zp
            assert torch.equal(fused, ops.int8.linear_int8(qx, s, code_zp, w, w_scales, bias, packed=packed))
            ref = ops.int8.linear_int8_reference(qx, s, code_zp, w, w_scales, bias)
            torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_static_w8a8_one_call_refuses_bad_parameters():
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    x, w_scales = torch.randn(3, 16), torch.rand(8)
    for scale, zp, dtype, err in ((0.0, 0, torch.uint8, ValueError), (float("inf"), 0, torch.uint8, ValueError),
                                  (0.1, 256, torch.uint8, ValueError), (0.1, 3, torch.int8, ValueError),
                                  (0.1, 0, torch.int16, TypeError)):
        with pytest.raises(err, match="scale|zero_point|dtype"):
            ops.int8.linear_w8a8(x, w, w_scales, None, None, scale, zp, dtype)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.int8.linear_w8a8(x, w, w_scales, None, None, 0.1, 0, torch.uint8)


def _packed_layers():
    torch.manual_seed(2)
    lin = torch.nn.Linear(96, 40)
    layers = [ts.nn.WeightOnlyLinear.from_linear(lin, fmt, g, "auto")
              for fmt, g in (("int8", 96), ("uint8", 32), ("int4", 32), ("uint4", 64), ("uint3", 32))]
    layers += [ts.nn.LowBitLinear.from_linear(lin, fmt, g) for fmt, g in (("fp8_e4m3", 32), ("nvfp4", 16),
                                                                         ("int3", 32))]
    layers += [ts.nn.W4A8Linear.from_linear(lin, fmt, g) for fmt, g in (("int4", 32), ("uint4", 96))]
    return layers


def test_layers_call_their_kernel_directly_with_the_ops_bits():
    # A packed layer's eager fp32 call skips the op's per-call argument checks; the kernel,
    # its arguments and so the bits are those of the op.
    for layer in _packed_layers():
        for shape in ((1, 96), (5, 96), (2, 3, 96), (40, 96)):
            x = torch.randn(*shape)
            with torch.no_grad():
                direct = layer(x)
            if isinstance(layer, ts.nn.WeightOnlyLinear):
                via_op = ops.linear_weight_only(x, layer.qweight, layer.scales, layer.zero_points, layer.bias,
                                                layer.fmt, layer.group_size, 96)
            elif isinstance(layer, ts.nn.W4A8Linear):
                via_op = ops.linear_w4a8(x, layer.qweight, layer.scales, layer.zero_points, layer.bias,
                                         layer.fmt, layer.group_size, 96)
            else:
                via_op = ops.linear_lowbit(x, layer.qweight, layer.scales, layer.zero_points, layer.tensor_scale,
                                           layer.bias, layer.fmt, layer.group_size, 96)
            assert direct.shape == (*shape[:-1], 40)
            assert torch.equal(direct, via_op), (layer.fmt, shape)
        # The layers above do take the direct call (rows below decode_gemm's threshold).
        x = torch.randn(5, 96)
        if isinstance(layer, ts.nn.WeightOnlyLinear):
            assert ops.weight_only.linear_weight_only_direct(
                x, layer.qweight, layer.scales, layer.zero_points, layer.bias, layer.fmt, layer.group_size, 96,
                "auto") is not None
        elif isinstance(layer, ts.nn.W4A8Linear):  # its call plan: the native function, not the op
            real, ops.linear_w4a8 = ops.linear_w4a8, None
            try:
                with torch.no_grad():
                    layer(x)
            finally:
                ops.linear_w4a8 = real
        else:
            assert ops.lowbit.linear_lowbit_direct(
                x, layer.qweight, layer.scales, layer.zero_points, layer.tensor_scale, layer.bias, layer.fmt,
                layer.group_size, 96, "auto") is not None
        # A strided input (not rows-contiguous) and bf16 go the op's way, same results.
        xt = torch.randn(96, 3).t()
        assert torch.equal(layer(xt), layer(xt.contiguous()))
        xb = torch.randn(3, 96, dtype=torch.bfloat16)
        assert layer(xb).dtype == torch.bfloat16


def test_direct_layer_calls_leave_the_dispatcher_its_work():
    layers = _packed_layers()
    for layer in (layers[2], layers[6], layers[-2]):  # int4 weight-only, nvfp4, w4a8
        x = torch.randn(3, 96)
        name = ("linear_weight_only" if isinstance(layer, ts.nn.WeightOnlyLinear) else
                "linear_w4a8" if isinstance(layer, ts.nn.W4A8Linear) else "linear_lowbit")
        with _Seen() as seen:
            layer(x)
        assert any(name in n for n in seen.names)
        xg = x.clone().requires_grad_()
        layer(xg).sum().backward()  # autograd still reaches the input through the op
        assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_a_bias_reset_as_a_parameter_is_still_added():
    layer = _packed_layers()[0]
    x = torch.randn(2, 96)
    want = layer(x) + 1.0
    layer.bias = torch.nn.Parameter(layer.bias.detach() + 1.0, requires_grad=False)
    assert "bias" not in layer._buffers
    torch.testing.assert_close(layer(x), want)
