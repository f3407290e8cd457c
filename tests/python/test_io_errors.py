"""ts.save / ts.load / `tensorslim inspect` on bad paths and bad files: a ValueError (or
FileNotFoundError) naming the file, one line and exit code 2 from the CLI, and the model
left exactly as it was."""
import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tensorslim as ts
from tensorslim.cli import main


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16))


def _snapshot(model):
    """Every parameter and buffer, by name, with the module type holding it."""
    types = {n: type(m) for n, m in model.named_modules()}
    return {k: (types[k.rpartition(".")[0]], v.clone()) for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    now = _snapshot(model)
    assert now.keys() == snap.keys()
    for k, (kind, value) in snap.items():
        assert now[k][0] is kind and torch.equal(now[k][1], value), k


@pytest.fixture
def saved(tmp_path):
    model = _model()
    ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    path = tmp_path / "good.slim.safetensors"
    ts.save(model, path)
    return path


def _metadata(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])["__metadata__"]


def _bad_files(tmp_path, good):
    """name -> (path, message fragment) for every kind of broken file."""
    raw = good.read_bytes()
    files = {}

    def write(name, data):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        return p

    files["truncated"] = (write("truncated", raw[: len(raw) // 2]), "truncated or corrupt")
    files["header_only_half"] = (write("header_only_half", raw[:40]), "truncated or corrupt")
    files["empty"] = (write("empty", b""), "truncated or corrupt")
    files["garbage"] = (write("garbage", bytes(range(256)) * 4), "truncated or corrupt")
    files["bad_header_json"] = (write("bad_header_json", raw[:8] + b"#" * 16 + raw[24:]), "truncated or corrupt")
    files["directory"] = (tmp_path, "is a directory")
    meta = _metadata(good)

    def with_meta(name, **changes):
        m = {**meta, **changes}
        m = {k: v for k, v in m.items() if v is not None}
        p = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.zeros(2)}, str(p), metadata=m)
        return p

    files["no_metadata"] = (tmp_path / "plain.safetensors", "not a tensorslim file")
    save_file({"w": torch.zeros(2)}, str(files["no_metadata"][0]))
    files["no_layers"] = (with_meta("no_layers", **{"tensorslim.layers": None}), "no tensorslim.layers")
    files["layers_not_json"] = (with_meta("layers_not_json", **{"tensorslim.layers": "{oops"}), "not valid JSON")
    files["layers_not_object"] = (with_meta("layers_not_object", **{"tensorslim.layers": "[1, 2]"}),
                                  "must be a JSON object")
    files["spec_lacks_keys"] = (with_meta("spec_lacks_keys", **{"tensorslim.layers": '{"0": {"kind": "x"}}'}),
                                "layer '0'")
    files["bad_version"] = (with_meta("bad_version", **{"tensorslim.format_version": "one"}), "format_version")
    return files


BAD = ["truncated", "header_only_half", "empty", "garbage", "bad_header_json", "directory", "no_metadata",
       "no_layers", "layers_not_json", "layers_not_object", "spec_lacks_keys", "bad_version"]


@pytest.mark.parametrize("bad", BAD)
def test_load_of_a_bad_file_names_it_and_leaves_the_model(tmp_path, saved, bad):
    path, fragment = _bad_files(tmp_path, saved)[bad]
    model = _model(seed=1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=fragment) as info:
        ts.load(model, path)
    assert str(path) in str(info.value)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", BAD)
def test_inspect_of_a_bad_file_is_one_line_and_exit_code_2(tmp_path, saved, bad, capsys):
    path, fragment = _bad_files(tmp_path, saved)[bad]
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and fragment in err and str(path) in err
    assert "Traceback" not in err


def test_inspect_command_line_prints_no_traceback(tmp_path, saved):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(saved.read_bytes()[:100])
    run = subprocess.run([sys.executable, "-m", "tensorslim.cli", "inspect", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("tensorslim inspect: ") and run.stderr.count("\n") == 1
    assert str(path) in run.stderr and "Traceback" not in run.stderr


def test_missing_file(tmp_path):
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ts.load(model, tmp_path / "missing.safetensors")
    assert_unchanged(model, snap)
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2


def test_file_of_another_model_leaves_every_tensor_alone(tmp_path, saved):
    """Matching layers but a LayerNorm of another width: nothing is copied, nothing swapped."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16, bias=False))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"does not match the model.*unexpected \['3.bias'\]") as info:
        ts.load(model, saved)
    assert str(saved) in str(info.value)
    assert_unchanged(model, snap)
    # a packed tensor of the wrong shape: caught before any copy
    raw = ts.io._read(saved, lambda f: {k: f.get_tensor(k) for k in f.keys()})
    raw["0.scales"] = raw["0.scales"][:, :1].contiguous()
    bad = tmp_path / "bad_scales.safetensors"
    save_file(raw, str(bad), metadata=_metadata(saved))
    model = _model(seed=2)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"0\.scales: file has torch.float32 \(32, 1\), model torch.float32 \(32, 2\)"):
        ts.load(model, bad)
    assert_unchanged(model, snap)


def test_save_into_a_missing_directory_or_onto_a_directory(tmp_path):
    model = _model()
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    with pytest.raises(ValueError, match="does not exist") as info:
        ts.save(model, tmp_path / "no" / "such" / "dir" / "m.safetensors")
    assert str(tmp_path / "no" / "such" / "dir") in str(info.value)
    with pytest.raises(ValueError, match="is a directory"):
        ts.save(model, tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="nn.Module"):
        ts.save({"w": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="nn.Module"):
        ts.load("model", tmp_path / "x.safetensors")
