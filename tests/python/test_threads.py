"""The core's threads: torch's OpenMP team when torch has one, else our own pool."""
import os
import subprocess
import sys

import pytest
import torch

import tensorslim as ts
from tensorslim._native import _C, loaded_openmp_runtime

SCRIPT = r"""
import torch, tensorslim as ts
torch.manual_seed(0)
w = torch.randn(1024, 512)
q, s, z = ts.ops.quantize(w, "int4", 128)
x = torch.randn(3, 512)
y = ts.ops.linear_weight_only(x, q, s, z, None, "int4", 128, 512, "native")
print(ts._C.threading_backend())
torch.save((q, s, y), r"{out}")
"""


def _run(tmp_path, threads: str):
    out = tmp_path / f"{threads}.pt"
    env = dict(os.environ, TENSORSLIM_THREADS=threads)
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(out=out)], env=env,
                         capture_output=True, text=True, check=True)
    return res.stdout.strip().splitlines()[-1], torch.load(out)


def test_torch_openmp_is_shared_when_loaded():
    if not loaded_openmp_runtime():
        assert _C.threading_backend() == "own pool"
        return
    assert _C.threading_backend() == "host openmp"
    before = torch.get_num_threads()
    try:  # torch's thread setting now governs our kernels too
        torch.set_num_threads(1)
        assert _C.num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert _C.num_threads() == before


def test_both_thread_backends_give_identical_results(tmp_path):
    own_name, own = _run(tmp_path, "own")
    auto_name, auto = _run(tmp_path, "auto")
    assert own_name == "own pool"
    assert auto_name == ("host openmp" if loaded_openmp_runtime() else "own pool")
    for a, b in zip(own, auto):
        assert torch.equal(a, b)


def test_errors_cross_the_parallel_region():
    x = torch.randn(4096, 256)
    x[3000, 7] = float("nan")
    with pytest.raises(ValueError, match="row 3000"):
        ts.ops.quantize(x, "int8", 256, backend="native")


def test_bad_threads_setting_is_rejected():
    env = dict(os.environ, TENSORSLIM_THREADS="fast")
    res = subprocess.run([sys.executable, "-c", "import tensorslim"], env=env, capture_output=True,
                         text=True)
    assert res.returncode != 0 and "TENSORSLIM_THREADS must be 'auto' or 'own'" in res.stderr
