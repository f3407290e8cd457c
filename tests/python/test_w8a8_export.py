"""Static W8A8 linears in traced graphs: the calibrated scale and zero point reach the op as
tensors (ops.int8.linear_w8a8_static), so torch.export (dynamic batch), torch.compile with
fullgraph=True and meta tensors work; before, the module read them on the host
(`float(act_scale)`), a data-dependent value every tracer refused."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim import ops


def _model(**cfg):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40)).eval()
    ts.quantize(m, ts.W8A8(skip_output_head=False, **cfg), calib_data=[torch.randn(8, 64) for _ in range(2)],
                progress=False)
    assert all(isinstance(l, ts.Int8Linear) and l.mode == "static" for l in (m[0], m[2]))
    return m


@pytest.mark.parametrize("cfg", [{}, {"act_symmetric": True}, {"smoothquant": False, "backend": "reference"}])
def test_static_w8a8_exports_and_compiles_fullgraph(cfg):
    model = _model(**cfg)
    batch = torch.export.Dim("b", min=2, max=300)
    exported = torch.export.export(model, (torch.randn(3, 64),), dynamic_shapes={"input": {0: batch}})
    names = {str(n.target) for n in exported.graph.nodes}
    assert "tensorslim.linear_w8a8_static.default" in names
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for rows in (2, 17, 64, 300):
        x = torch.randn(rows, 64)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


def test_meta_forward_and_opcheck():
    model = _model()
    meta = copy.deepcopy(model).to("meta")
    assert meta(torch.empty(5, 64, device="meta")).shape == (5, 40)
    layer, x = model[0], torch.randn(6, 64)
    args = (x, layer.qweight, layer.w_scales, layer.bias, layer.inv_smooth, layer.act_scale, layer.act_zero_point,
            False, "auto", None)
    torch.library.opcheck(torch.ops.tensorslim.linear_w8a8_static.default, args)
    # the same bits as the float-argument op
    want = ops.linear_w8a8(x, layer.qweight, layer.w_scales, layer.bias, layer.inv_smooth, float(layer.act_scale),
                           int(layer.act_zero_point))
    assert torch.equal(ops.int8.linear_w8a8_static(*args[:-3]), want)


def test_bad_calibrated_scale_is_a_clear_error_when_the_op_runs():
    model = _model()
    with torch.no_grad():
        model[0].act_scale.fill_(0.0)
    exported = torch.export.export(model, (torch.randn(3, 64),))
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        exported.module()(torch.randn(3, 64))
