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
    with pytest.raises(ValueError, match=r"layer '0'.*tensor '0\.scales' is \[32, 1\] in the file, the spec makes \[32, 2\]"):
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


def _rewritten(src, dst, edit):
    """A copy of a saved file with its header edited: edit(layers dict, metadata dict)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    layers = json.loads(meta["tensorslim.layers"])
    edit(layers, meta)
    meta["tensorslim.layers"] = json.dumps(layers)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _mlp_fresh():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))


@pytest.mark.parametrize("make, edit, match", [
    # a size that would allocate before any check (2**28 values: 1.5 GB for a 16 KB file)
    (ts.Unstructured(0.9), lambda L, m: L["0"].update(nnz=2 ** 28), r"tensor '0\.values' is \[819\] in the file"),
    (ts.Unstructured(0.9), lambda L, m: L["0"].update(nnz=-1), "negative dimension"),
    # fields a module accepted and failed on at the first forward, or ignored
    (ts.NM(2, 4), lambda L, m: L["0"].update(m=5), r"need m in \(4, 8\)"),
    (ts.IntWeightOnly(bits=3, group_size=32), lambda L, m: L["0"].update(group_size=33), "whole number of bytes"),
    (ts.Binary(activations=True), lambda L, m: L["0"].update(format="int8"), "module it makes has format='binary'"),
    (ts.Unstructured(0.9), lambda L, m: m.update({"tensorslim.aliases": '{"0.bias": ["x"]}'}), "alias '0.bias'"),
])
def test_header_values_are_checked_before_anything_is_built(tmp_path, make, edit, match):
    model = _mlp_fresh()
    (ts.sparsify if isinstance(make, (ts.NM, ts.Unstructured)) else ts.quantize)(model, make, progress=False)
    src = tmp_path / "good.safetensors"
    ts.save(model, src)
    bad = _rewritten(src, tmp_path / "bad.safetensors", edit)
    fresh = _mlp_fresh()
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=match) as info:
        ts.load(fresh, bad)
    assert str(bad) in str(info.value)
    assert_unchanged(fresh, snap)


def test_pruning_header_sets_only_sizes_that_shrink(tmp_path):
    model = _mlp_fresh()
    ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs=torch.randn(2, 64), progress=False)
    src = tmp_path / "pruned.safetensors"
    ts.save(model, src)
    cases = (({"forward": 1}, "no size attribute 'forward'"), ({"out_features": 999}, "in 1..128"),
             ({"out_features": -3}, "in 1..128"), ({"out_features": True}, "in 1..128"))
    for fresh in _refused_pruning_headers(src, tmp_path, "0", cases, _mlp_fresh):
        assert fresh[0].out_features == 128


def _refused_pruning_headers(src, tmp_path, name, cases, build):
    """For each (structured attrs of module `name`, error pattern): the file at src with that
    entry, refused by ts.load into a fresh build(), which is yielded unchanged."""
    for attrs, match in cases:
        def edit(layers, meta):
            pruning = json.loads(meta["tensorslim.pruning"])
            pruning["structured"][name] = attrs
            meta["tensorslim.pruning"] = json.dumps(pruning)

        bad = _rewritten(src, tmp_path / "bad.safetensors", edit)
        fresh = build()
        snap = _snapshot(fresh)
        with pytest.raises(ValueError, match=match):
            ts.load(fresh, bad)
        assert_unchanged(fresh, snap)
        yield fresh


def _phi3(prune=False):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                       pad_token_id=0, bos_token_id=0, eos_token_id=1)).eval()
    if prune:
        ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5), example_inputs={"input_ids": ids}, progress=False)
    return model


def test_pruning_header_config_sizes(tmp_path):
    """A size the layer reads from the config every layer shares (Phi-3's
    config.num_attention_heads) follows the same rules, and a refused file leaves every
    attention on the model's own config, even where the bad entry came after a good one."""
    src = tmp_path / "pruned.safetensors"
    ts.save(_phi3(prune=True), src)
    cases = (({"config.num_attention_heads": 9}, "in 1..4"), ({"config.forward": 1}, "no size attribute"),
             ({"config._attn_implementation": 1}, "no size attribute"),
             ({"config.num_attention_heads": True}, "in 1..4"),
             ({"config.num_attention_heads": 2, "num_key_value_heads": 99}, "in 1..4"))
    for fresh in _refused_pruning_headers(src, tmp_path, "model.layers.1.self_attn", cases, _phi3):
        assert all(layer.self_attn.config is fresh.config for layer in fresh.model.layers)


def test_special_files_symlinks_and_meta_models(tmp_path, saved):
    import os

    model = _model()
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match="not a regular file"):
        ts.save(model, pipe)  # was renamed over (as root, /dev/null became a file)
    assert pipe.is_fifo()
    with pytest.raises(ValueError, match="is not a regular file"):
        ts.load(_model(), pipe)  # blocked forever on the read before
    target, link = tmp_path / "target.safetensors", tmp_path / "link.safetensors"
    target.write_bytes(b"old")
    link.symlink_to(target)
    ts.save(model, link)  # written through the link, as open() would; the link stays
    assert link.is_symlink() and ts.io.read_header(target)["layers"]
    mask = os.umask(0o022)
    try:
        ts.save(model, tmp_path / "perm.safetensors")
    finally:
        os.umask(mask)
    assert (tmp_path / "perm.safetensors").stat().st_mode & 0o777 == 0o644  # 0600 before
    with torch.device("meta"):  # buffers on meta too: their values are gone (test_load_meta.py)
        on_meta = nn.Sequential(_model(), nn.BatchNorm1d(16))
    with pytest.raises(ValueError, match="buffer '1.running_mean' is on the meta device.*ts.empty_parameters"):
        ts.load(on_meta, saved)  # loaded "fine" before, every float tensor left on meta


def test_a_layer_without_bias_or_a_bag_of_another_mode_is_not_the_saved_one(tmp_path):
    """Bias presence and an EmbeddingBag's reduction are part of the layer (a bias=False model
    gained the file's biases; a mean bag loaded a sum bag's file and returned sums)."""
    model = _model()
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    torch.manual_seed(0)
    no_bias = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16))
    with pytest.raises(ValueError, match="layer '0'.*with bias"):
        ts.load(no_bias, path)
    assert type(no_bias[0]) is nn.Linear and no_bias[0].bias is None
    bags = nn.Sequential(nn.EmbeddingBag(50, 16, mode="sum"))
    ts.quantize(bags, ts.Int8WeightOnly(skip_output_head=False), progress=False)
    ts.save(bags, tmp_path / "bag.safetensors")
    with pytest.raises(ValueError, match="layer '0'.*different layer"):
        ts.load(nn.Sequential(nn.EmbeddingBag(50, 16, mode="mean")), tmp_path / "bag.safetensors")
