import torch
from safetensors.torch import save_file
from torch import nn

import tensorslim as ts
from tensorslim.cli import main


def test_info_lists_kernels_and_formats(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"tensorslim {ts.__version__}" in out
    assert "int4" in out and "best ISA" in out and "CUDA kernels" in out
    assert ("oneDNN: linked" in out) == ts._C.built_with_onednn()
    from tensorslim.ops import torch_onednn

    narrow = torch_onednn.default_weight_qmax(4096, 4096) == 64  # the AVX2-capped run of this suite
    assert ("weight codes in [-64, 64]" in out) == narrow and ("full-range codes" in out) != narrow


def test_inspect_shows_saved_layers(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128))
    ts.quantize(model, ts.Int4WeightOnly(group_size=64), progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert lines["0"][1:5] == ["weight_only_linear", "int4", "64", "[64,"]
    assert lines["2"][1:5] == ["weight_only_linear", "int4", "64", "[128,"]
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert f"{expected / 2**20:.2f} MiB" in out.splitlines()[0]


def test_inspect_shows_pruning(tmp_path, capsys):
    """Pruned layers stay float, so the layer table has no rows for them: the file's pruning
    record is printed below it (before, a pruned file showed an empty table)."""
    torch.manual_seed(0)
    masked = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    ts.prune(masked, ts.Magnitude(sparsity=0.75), progress=False)
    ts.save(masked, tmp_path / "masked.safetensors")
    assert main(["inspect", str(tmp_path / "masked.safetensors")]) == 0
    assert "pruning masks (dense weights, zeros kept by the masks): 0 75.0%, 2 75.0%" in capsys.readouterr().out
    channels = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    ts.prune(channels, ts.ChannelPrune(ratio=0.5), example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    ts.save(channels, tmp_path / "channels.safetensors")
    assert main(["inspect", str(tmp_path / "channels.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "channels removed: 0 (out_channels=8)" in out and "channels removed: 2 (in_channels=8)" in out


def test_inspect_rejects_foreign_file(tmp_path, capsys):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert main(["inspect", str(path)]) == 2
    assert "not a tensorslim file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2


def test_bench_lists_runs_and_rejects_unknown_names(capsys):
    from tensorslim import cli
    assert cli.main(["bench", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"linear", "w8a8", "distill", "prune", "lowrank"} <= set(names)
    assert cli.main(["bench", "no_such"]) == 2
    assert "unknown benchmark(s) ['no_such']" in capsys.readouterr().err
    # One small run through the command, its own arguments after --.
    assert cli.main(["bench", "distill", "--", "--sizes", "64x1000", "--min-time", "0.01",
                     "--dtype", "fp32"]) == 0


def test_bench_needs_a_checkout(tmp_path, capsys):
    from tensorslim import cli
    assert cli.main(["bench", "--dir", str(tmp_path)]) == 2
    assert "ship with the source tree" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_commands():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "tensorslim", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("tensorslim ") and "CPU kernels" in res.stdout
    res = subprocess.run([sys.executable, "-m", "tensorslim", "inspect", "missing.safetensors"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
