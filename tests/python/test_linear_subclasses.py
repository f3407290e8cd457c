"""nn.Linear subclasses that compute nn.Linear's product (forward kept, or transformers'
FalconLinear) are compressed like nn.Linear; others are skipped; skipped ones keep their class."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.linear_subclasses import stands_for_linear


class MarkedLinear(nn.Linear):  # a library's marker class: nn.Linear's forward
    pass


class ScaledLinear(nn.Linear):  # computes something else: must stay as it is
    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(MarkedLinear(64, 64), nn.ReLU(), ScaledLinear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_marker_subclasses_compress_and_others_are_skipped():
    model = _model()
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert isinstance(model[0], ts.WeightOnlyLinear) and type(model[2]) is ScaledLinear
    rows = {c.name: c for c in report.changes}
    assert rows["0"].module_type == "MarkedLinear" and rows["0"].action != "skipped"
    assert rows["2"].action == "skipped" and "ScaledLinear layers are not supported" in rows["2"].reason
    with torch.no_grad():
        assert (model(x) - want).abs().max() < 0.02 * want.abs().max()


def test_a_skipped_subclass_keeps_its_class_and_parameters():
    model = _model()
    weight = model[0].weight
    ts.quantize(model, ts.Int8WeightOnly(exclude=["0"]), progress=False)
    assert type(model[0]) is MarkedLinear and model[0].weight is weight


def test_a_fold_into_a_skipped_subclass_is_kept():
    # SmoothQuant folds into every linear reading the smoothed input, the skipped one too
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), MarkedLinear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(16, 64) * torch.linspace(0.1, 8, 64)
    with torch.no_grad():
        want = model(x)
    ts.quantize(model, ts.W8A8(smoothquant_alpha=0.5, exclude=["1"]), calib_data=[x], progress=False)
    assert type(model[1]) is MarkedLinear
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_parametrized_and_attention_out_proj_are_not_stand_ins():
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    assert not stands_for_linear(lin) and stands_for_linear(MarkedLinear(2, 2))
    assert not stands_for_linear(nn.Linear(2, 2)) and not stands_for_linear(ScaledLinear(2, 2))
    attn = nn.MultiheadAttention(16, 4)
    attn.register_forward_hook(lambda *a: None)  # kept packed: out_proj is read, not called
    model = nn.ModuleDict({"attn": attn, "fc": nn.Linear(16, 16)})
    ts.quantize(model, ts.Int8Dynamic(), progress=False)
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_falcon_is_compressed():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False)
    model = transformers.FalconForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    falcon = [c for c in report.changed if c.module_type == "FalconLinear"]
    assert len(falcon) == 8  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h per layer
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.02  # INT8 rounding (0.012 measured)
