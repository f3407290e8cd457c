"""The Report accounts for every module holding a weight matrix, whatever its class: a Conv2d
subclass with a child module (EfficientNet ports' "same padding" conv keeps a ZeroPad2d inside)
is listed as skipped with a reason, by the one-shot and the block-by-block recipes alike."""
import pytest
import torch
from torch import nn

import tensorslim as ts


class Conv2dSame(nn.Conv2d):
    """A conv padding its input itself, as TensorFlow's "same" padding ports do."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return super().forward(self.pad(x))


class LinearWithScale(nn.Linear):
    """An nn.Linear subclass with a child: not the class recipes handle, so it is reported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(super().forward(x))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64),
                         LinearWithScale(64, 32), nn.LayerNorm(32), nn.Linear(32, 16))


CALIB = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]


@pytest.mark.parametrize("cfg", [ts.Int8WeightOnly(), ts.W8A8(smoothquant=False), ts.GPTQ(group_size=32)],
                         ids=["weight_only", "w8a8", "gptq"])
def test_layers_with_children_are_reported_skipped(cfg):
    model = _model()
    report = ts.quantize(model, cfg, calib_data=CALIB, progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["0"].action == "skipped" and "Conv2dSame layers are not supported" in rows["0"].reason
    assert rows["4"].action == "skipped" and "LinearWithScale" in rows["4"].reason
    assert rows["3"].action == "quantized"
    assert "5" not in rows  # a norm's 1-D scale is no weight matrix
    assert {"0", "4"} <= {c.name for c in ts.summary(model).skipped}
    assert type(model[0]) is Conv2dSame and type(model[4]) is LinearWithScale


def test_factorize_reports_them_too():
    model = _model()
    with pytest.warns(UserWarning, match="nothing was compressed"):  # the only conv is the subclass
        report = ts.factorize(model, ts.Tucker(ranks=(2, 2)), progress=False)
    row = next(c for c in report.changes if c.name == "0")
    assert row.action == "skipped" and "Conv2dSame" in row.reason


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_summary_counts_a_half_model_in_its_own_dtype(dtype, tmp_path):
    """ts.summary's 'before' is the replaced layers' bytes in the model's dtype (it assumed fp32:
    a bf16 model's savings read twice as large), as the verbs' Reports give, after a load too."""
    from tensorslim.report import module_bytes

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(dtype)

    for verb, cfg in ((ts.quantize, ts.Int8WeightOnly(skip_output_head=False)), (ts.factorize, ts.SVD(rank=8))):
        model = mlp()
        dense = module_bytes(model)
        report = verb(model, cfg, progress=False)
        assert report.totals()[0] == dense and ts.summary(model).totals() == (dense, module_bytes(model))
        ts.save(model, tmp_path / "m.safetensors")
        fresh = mlp()
        ts.load(fresh, tmp_path / "m.safetensors")
        assert ts.summary(fresh).totals() == (dense, module_bytes(fresh))
