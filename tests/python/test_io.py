"""ts.save / ts.load: safetensors with a versioned header, exact reloads, clear errors."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tensorslim as ts


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.LayerNorm(128))
    return m


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    model = _model()
    ts.quantize(model, ts.Int4WeightOnly(group_size=64, symmetric=False), progress=False)
    with pytest.warns(UserWarning, match="nothing was compressed"):
        ts.quantize(model, ts.Int8WeightOnly(), progress=False)  # nothing left to do
    path = tmp_path / "m.slim.safetensors"
    ts.save(model, path)
    fresh = _model()
    fresh[3].weight.data.fill_(0.5)  # loaded state must overwrite everything
    ts.load(fresh, path)
    assert isinstance(fresh[0], ts.WeightOnlyLinear) and fresh[0].fmt == "uint4"
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), model(x))


def test_file_is_plain_safetensors_with_versioned_header(tmp_path):
    model = _model()
    ts.quantize(model, "int8", progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    assert meta["tensorslim.format"] == "tensorslim" and meta["tensorslim.format_version"] == "1"
    layers = json.loads(meta["tensorslim.layers"])
    assert layers["0"] == {"kind": "weight_only_linear", "format": "int8", "group_size": 128,
                           "in_features": 128, "out_features": 256, "bias": True}
    assert header["0.qweight"]["dtype"] == "I8" and "0.weight" not in header
    assert ts.io.read_header(path)["layers"] == layers


def test_tied_weights_are_stored_once(tmp_path):
    model = nn.Module()
    model.embed = nn.Embedding(50, 32)
    model.out = nn.Linear(32, 50, bias=False)
    model.out.weight = model.embed.weight
    path = tmp_path / "tied.safetensors"
    ts.save(model, path)
    fresh = nn.Module()
    fresh.embed = nn.Embedding(50, 32)
    fresh.out = nn.Linear(32, 50, bias=False)
    fresh.out.weight = fresh.embed.weight
    ts.load(fresh, path)
    assert torch.equal(fresh.out.weight, model.embed.weight)


def test_a_transposed_view_is_not_taken_for_a_tied_tensor(tmp_path):
    def model():
        m = nn.Module()
        m.w = nn.Parameter(torch.randn(8, 8))
        m.register_buffer("wt", m.w.detach().t())  # same storage, offset and shape; other strides
        return m

    torch.manual_seed(0)
    saved = model()
    ts.save(saved, tmp_path / "m.safetensors")
    fresh = model()
    ts.load(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh.w, saved.w) and torch.equal(fresh.wt, saved.w.t())


def test_mismatched_model_is_rejected_and_left_alone(tmp_path):
    model = _model()
    ts.quantize(model, "int4", progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    other = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    with pytest.raises(ValueError, match="layer '2'"):
        ts.load(other, path)
    assert all(type(m) is not ts.WeightOnlyLinear for m in other.modules())
    partial = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))  # no LayerNorm
    with pytest.raises(ValueError, match="does not match"):
        ts.load(partial, path)
    assert all(type(m) is not ts.WeightOnlyLinear for m in partial.modules())


def test_skipped_layers_stay_in_the_summary_after_load(tmp_path):
    model = _model()
    ts.sparsify(model, ts.NM(2, 4, exclude=["2"]), progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    fresh = _model()
    ts.load(fresh, path)
    rows = [(c.name, c.module_type, c.bytes_before, c.reason) for c in ts.summary(fresh).skipped]
    assert rows == [("2", "Linear", 256 * 128 * 4 + 128 * 4, "excluded by pattern '2'")]
    assert [c.name for c in ts.summary(model).skipped] == ["2"]
    meta = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])["__metadata__"]
    assert meta["tensorslim.format_version"] == "1"  # an optional key: older readers ignore it
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "tensorslim.skipped": json.dumps({"2": {"type": "Linear"}})})
    untouched = _model()
    with pytest.raises(ValueError, match="tensorslim.skipped row '2'"):
        ts.load(untouched, bad)
    assert type(untouched[0]) is nn.Linear


def test_foreign_and_future_files_are_rejected(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a tensorslim file"):
        ts.load(_model(), plain)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(future), metadata={
        "tensorslim.format": "tensorslim", "tensorslim.format_version": "99", "tensorslim.layers": "{}"})
    with pytest.raises(ValueError, match="version 99"):
        ts.load(_model(), future)


@pytest.mark.parametrize("prune_cfg", [ts.Magnitude(sparsity=0.5), ts.ChannelPrune(ratio=0.5)])
def test_factorized_then_pruned_model_loads(prune_cfg, tmp_path):
    """Pruning the factors of a factorized model: the file's masks / shapes name layers inside
    the factorized ones, which the load puts in first (it raised 'pruned layer 0.down does not
    exist')."""
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))

    model = mlp()
    ts.factorize(model, ts.SVD(ratio=0.5), progress=False)
    ts.prune(model, prune_cfg, calib_data=[torch.randn(8, 64)], progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    fresh = mlp()
    ts.load(fresh, path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert {n for n, _ in fresh.named_modules()} == {n for n, _ in model.named_modules()}
