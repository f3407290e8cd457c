"""`tensorslim compress RECIPE`: prune -> factorize -> quantize from a YAML/JSON recipe, saved
with ts.save and loaded into a fresh model with the same outputs; bad recipes change nothing."""
import json
import textwrap

import pytest
import torch

import tensorslim as ts
from tensorslim import cli, recipe

FIXTURE = textwrap.dedent('''
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))

    def batches():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(16, 64, generator=g) for _ in range(4)]
''')

STEPS = [{"prune": {"type": "ChannelPrune", "ratio": 0.5}},
         {"factorize": {"type": "SVD", "energy": 0.9}},
         {"quantize": "int8_dynamic"}]


@pytest.fixture
def fixture_module(tmp_path, monkeypatch):
    (tmp_path / "recipe_fixture.py").write_text(FIXTURE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import recipe_fixture
    return importlib.reload(recipe_fixture)


def _write(tmp_path, body, suffix=".yaml"):
    path = tmp_path / f"recipe{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(body))
    else:
        import yaml
        path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_compress_runs_every_step_and_the_file_loads(tmp_path, fixture_module, suffix):
    path = _write(tmp_path, {"model": "recipe_fixture:mlp", "calib": "recipe_fixture:batches",
                             "steps": STEPS}, suffix)
    out = tmp_path / "mlp.slim.safetensors"
    assert cli.main(["compress", str(path), "--out", str(out)]) == 0
    # The same steps in this process: the file holds that model.
    want = fixture_module.mlp()
    recipe.apply_steps(want, recipe.parse_steps(STEPS), fixture_module.batches())
    got = ts.load(fixture_module.mlp(), out)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(got(x), want(x))
    kinds = {type(m).__name__ for m in got.modules()}
    assert "LowRankLinear" in kinds and "Int8Linear" in kinds
    assert recipe.model_bytes(got) < 0.5 * recipe.model_bytes(fixture_module.mlp())


def test_prune_then_store_sparse(tmp_path, fixture_module):
    steps = [{"prune": {"type": "Magnitude", "sparsity": 0.9}}, {"sparsify": {"type": "SparseStorage"}}]
    path = _write(tmp_path, {"model": "recipe_fixture:mlp", "steps": steps})
    out = tmp_path / "sparse.safetensors"
    assert cli.main(["compress", str(path), "--out", str(out)]) == 0  # "a quantize config" before
    got = ts.load(fixture_module.mlp(), out)
    assert isinstance(got[2], ts.CSRSparseLinear) and got[2].nnz == round(0.1 * 256 * 256)


def test_model_and_weights_from_the_command_line(tmp_path, fixture_module):
    from safetensors.torch import save_file
    dense = fixture_module.mlp()
    with torch.no_grad():
        for p in dense.parameters():
            p.mul_(2.0)  # weights differ from what mlp() builds: they must be the ones used
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "w.safetensors"))
    path = _write(tmp_path, {"steps": [{"quantize": {"type": "Int8WeightOnly"}}]})
    out = tmp_path / "q.safetensors"
    assert cli.main(["compress", str(path), "--out", str(out), "--model", "recipe_fixture:mlp",
                     "--weights", str(tmp_path / "w.safetensors")]) == 0
    got = ts.load(fixture_module.mlp(), out)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = dense(x)
        assert float((got(x) - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize("steps,message", [
    ([{"sparsify": {"type": "NM", "n": 5}}], "n must be"),
    ([{"distill": {}}], "unknown step 'distill'"),
    ([{"quantize": "int7_magic"}], "unknown preset 'int7_magic'"),
    ([{"prune": {"type": "Magnitude", "sparsity": "high"}}], "sparsity"),
    ([{"prune": {"ratio": 0.5}}], "'type'"),
    ([], "non-empty list"),
    ([{"prune": {"type": "Magnitude"}, "quantize": "int8"}], "expected one of"),
    ([{"quantize": "int8"}, {"quantize": {"type": "SVD", "rank": 4}}], "SVD is a factorize config"),
    ([{"prune": {"type": "Int8WeightOnly"}}], "Int8WeightOnly is a quantize config"),
    ([{"sparsify": {"type": "Magnitude", "sparsity": 0.5}}], "Magnitude is a prune config"),
    ([{"quantize": {"type": "SparseStorage"}}], "SparseStorage is a sparsify config"),  # ran the steps before
])
def test_bad_recipes_are_one_line_errors_and_write_nothing(tmp_path, fixture_module, capsys, steps, message):
    path = _write(tmp_path, {"model": "recipe_fixture:mlp", "steps": steps})
    out = tmp_path / "never.safetensors"
    assert cli.main(["compress", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_targets_and_files(tmp_path, fixture_module):
    path = _write(tmp_path, {"model": "recipe_fixture:nope", "steps": [{"quantize": "int8"}]})
    with pytest.raises(ValueError, match="cannot find 'recipe_fixture:nope'"):
        recipe.run(path, tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="module.path:callable"):
        recipe.run(path, tmp_path / "o.safetensors", model_target="no_colon")
    with pytest.raises(ValueError, match="cannot read the recipe"):
        recipe.load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("steps: [unclosed")
    with pytest.raises(ValueError, match="not a valid recipe file"):
        recipe.load_recipe(tmp_path / "broken.yaml")
    # tracebacks before: a callable that needs arguments, an empty module name, a non-UTF-8 file
    with pytest.raises(ValueError, match=r"'torch.nn:Linear'\(\) raised TypeError"):
        recipe.run(path, tmp_path / "o.safetensors", model_target="torch.nn:Linear")
    with pytest.raises(ValueError, match="module.path:callable"):
        recipe.run(path, tmp_path / "o.safetensors", model_target=":mlp")
    (tmp_path / "latin.yaml").write_bytes(b"steps: [\xff]\n")
    with pytest.raises(ValueError, match="latin.yaml: the recipe is not UTF-8"):
        recipe.load_recipe(tmp_path / "latin.yaml")
    ok = _write(tmp_path, {"model": "recipe_fixture:mlp", "steps": [{"quantize": "int8"}]})
    with pytest.raises(ValueError, match="does not exist"):  # refused before the steps run
        recipe.run(ok, tmp_path / "no" / "o.safetensors")


def test_weights_and_calibration_that_do_not_fit_are_one_line_errors(tmp_path, fixture_module):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    path = _write(tmp_path, {"model": "recipe_fixture:mlp", "weights": str(tmp_path / "w.safetensors"),
                             "steps": [{"quantize": "int8"}]})
    with pytest.raises(ValueError, match="does not match recipe_fixture:mlp"):
        recipe.run(path, tmp_path / "o.safetensors")
    (tmp_path / "calib_none.py").write_text("def batches():\n    return None\n")
    path = _write(tmp_path, {"model": "recipe_fixture:mlp", "calib": "calib_none:batches",
                             "steps": [{"quantize": "int8"}]})
    with pytest.raises(ValueError, match="returned NoneType, not an iterable"):
        recipe.run(path, tmp_path / "o.safetensors")


def test_type_errors_and_missing_calibration_are_one_line_cli_errors(tmp_path, fixture_module, capsys):
    """A TypeError from a verb (integer calibration batches) printed a traceback; the missing
    calibration message speaks of the recipe's `calib:` too."""
    (tmp_path / "calib_long.py").write_text("import torch\ndef batches():\n    return [torch.ones(4, 64, dtype=torch.long)]\n")
    path = _write(tmp_path, {"model": "recipe_fixture:mlp", "calib": "calib_long:batches", "steps": [{"quantize": "w8a8"}]})
    assert cli.main(["compress", str(path), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "expected a float input tensor, got torch.int64" in capsys.readouterr().err
    path = _write(tmp_path, {"model": "recipe_fixture:mlp", "steps": [{"quantize": "w8a8"}]})
    assert cli.main(["compress", str(path), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "(in a recipe: calib: module.path:callable" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_models_resolve_from_the_working_directory(tmp_path, monkeypatch):
    """The installed `tensorslim` script does not put the working directory on sys.path
    (`python -m` does): a recipe's `model: mymodels:mlp` next to it was not found."""
    import sys

    (tmp_path / "cwd_models.py").write_text("import torch\ndef mlp():\n    return torch.nn.Linear(8, 8)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert isinstance(recipe.resolve("cwd_models:mlp", "model")(), torch.nn.Linear)
