"""ts.quantize with the weight-only configs: what is replaced, sizes, accuracy, errors."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from conftest import SQNR_FLOOR_DB, sqnr_db


def _mlp(seed=0, dims=(512, 1024, 512)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize("cfg,key,max_ratio", [
    (ts.Int8WeightOnly(), ("int8", None), 0.26),
    (ts.Int8WeightOnly(symmetric=False), ("uint8", None), 0.26),
    (ts.Int4WeightOnly(group_size=128), ("int4", 128), 0.15),
    (ts.Int4WeightOnly(group_size=128, symmetric=False), ("uint4", 128), 0.15),
    (ts.Int4WeightOnly(group_size=32), ("int4", 32), 0.19),
])
def test_weights_are_packed_small_and_accurate(cfg, key, max_ratio):
    model = _mlp()
    ref = copy.deepcopy(model)
    report = ts.quantize(model, cfg, progress=False)
    assert [c.name for c in report.changed] == ["0", "2"] and not report.skipped
    for name in ("0", "2"):
        mod, orig = model.get_submodule(name), ref.get_submodule(name)
        assert isinstance(mod, ts.WeightOnlyLinear)
        keys = set(mod.state_dict())
        assert "weight" not in keys and {"qweight", "scales", "bias"} <= keys
        before = sum(t.numel() * t.element_size() for t in orig.state_dict().values())
        after = sum(t.numel() * t.element_size() for t in mod.state_dict().values())
        assert after <= max_ratio * before, (after / before)
        assert sqnr_db(orig.weight, mod.dequantized_weight()) >= SQNR_FLOOR_DB[key]
    x = torch.randn(5, 512)
    with torch.no_grad():
        assert sqnr_db(ref(x), model(x)) >= SQNR_FLOOR_DB[key] - 3  # noise adds across 2 layers


def test_bf16_activations_keep_their_dtype():
    model = _mlp(dims=(256, 128))
    ts.quantize(model, "int4", progress=False)
    x = torch.randn(3, 256)
    y32 = model(x)
    y16 = model(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert sqnr_db(y32, y16.float()) > 30


def test_filters_and_skip_reasons():
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(100, 64)
    model.body = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 96), nn.Linear(96, 64))
    model.conv = nn.Conv1d(4, 4, 3)
    model.norm = nn.LayerNorm(64)  # 1-D scales: not a candidate, so not reported either
    model.lm_head = nn.Linear(64, 100, bias=False)
    model.tied = nn.Linear(64, 100, bias=False)
    model.tied.weight = model.embed.weight
    report = ts.quantize(model, ts.Int4WeightOnly(group_size=64, exclude=("body.0",)), progress=False)
    reasons = {c.name: c.reason for c in report.skipped}
    assert reasons["body.0"] == "excluded by pattern 'body.0'"
    assert "body.2" not in reasons  # in_features 96: groups of 64 and 32
    assert reasons["lm_head"].startswith("output head")
    assert reasons["tied"].startswith("output head")
    assert "Conv1d" in reasons["conv"]
    assert reasons["embed"].startswith("tied to the output layer 'tied'")  # a table shared with a head stays float
    assert "norm" not in reasons
    assert [c.name for c in report.changed] == ["body.1", "body.2"]
    assert isinstance(model.body[1], ts.WeightOnlyLinear) and type(model.body[0]) is nn.Linear
    text = str(ts.summary(model))
    assert "body.1" in text and "int4 per-channel" in text and "excluded by pattern" in text

    model2 = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    ts.quantize(model2, ts.Int8WeightOnly(include=("1",)), progress=False)
    assert type(model2[0]) is nn.Linear and isinstance(model2[1], ts.WeightOnlyLinear)
    model3 = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    ts.quantize(model3, ts.Int8WeightOnly(filter_fn=lambda n, m: n == "0"), progress=False)
    assert isinstance(model3[0], ts.WeightOnlyLinear) and type(model3[1]) is nn.Linear
    head = nn.Sequential(nn.Linear(64, 64))
    head.add_module("classifier", nn.Linear(64, 10))
    ts.quantize(head, ts.Int8WeightOnly(skip_output_head=False), progress=False)
    assert isinstance(head.classifier, ts.WeightOnlyLinear)


def test_failure_leaves_the_model_untouched():
    model = _mlp(dims=(64, 64, 64, 64))
    with torch.no_grad():
        model[4].weight[3, 7] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '4'.*NaN or Inf"):
        ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert all(type(m) is not ts.WeightOnlyLinear for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) or k == "4.weight" for k in before)


def test_bad_configs_and_arguments():
    with pytest.raises(ValueError, match="group_size"):
        ts.Int4WeightOnly(group_size=100)
    with pytest.raises(ValueError, match="algorithm"):
        ts.Int4WeightOnly(algorithm="magic")
    with pytest.raises(ValueError, match="backend"):
        ts.Int8WeightOnly(backend="gpu")
    with pytest.raises(ValueError, match="unknown preset"):
        ts.quantize(_mlp(), "int3")
    with pytest.raises(TypeError, match="nn.Module"):
        ts.quantize(object(), "int8")
    with pytest.raises(TypeError, match="config"):
        ts.quantize(_mlp(), 8)


def test_config_json_round_trip():
    for cfg in (ts.Int8WeightOnly(group_size=64, exclude=("head*",)),
                ts.Int4WeightOnly(group_size=32, symmetric=False, include=("a.*", "b"))):
        text = cfg.to_json()
        back = ts.Config.from_json(text)
        assert back == cfg and type(back) is type(cfg)
    with pytest.raises(ValueError, match="unknown fields"):
        ts.Config.from_dict({"type": "Int8WeightOnly", "bogus": 1})
    with pytest.raises(ValueError, match="newer"):
        ts.Config.from_dict({"type": "Int8WeightOnly", "version": 99})


def test_presets_by_name():
    for name, cls in (("int8", ts.WeightOnlyLinear), ("int4", ts.WeightOnlyLinear)):
        model = _mlp(dims=(256, 256))
        ts.quantize(model, name, progress=False)
        assert isinstance(model[0], cls) and model[0].fmt == name
