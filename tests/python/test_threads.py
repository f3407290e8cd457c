"""The core's threads: torch's OpenMP team by default (where torch loaded one), or its own pool
(TENSORSLIM_THREADS=own, TENSORSLIM_NUM_THREADS set, forked children)."""
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
# The INT8 GEMM's native kernel runs on the core's threads on every AVX2+ CPU.
qw = torch.randint(-128, 128, (1024, 512), dtype=torch.int8)
qx = torch.randint(0, 256, (3, 512), dtype=torch.uint8)
y = ts.ops.linear_int8(qx, torch.full((1,), 0.01), 120, qw, torch.rand(1024), None, backend="native")
print(ts._C.threading_backend())
torch.save((qw, y), r"{out}")
"""


def _run(tmp_path, threads: str):
    out = tmp_path / f"{threads}.pt"
    env = dict(os.environ, TENSORSLIM_THREADS=threads)
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(out=out)], env=env,
                         capture_output=True, text=True, check=True)
    return res.stdout.strip().splitlines()[-1], torch.load(out)


def _backend(env_extra: dict, script: str = "import tensorslim as ts; print(ts._C.threading_backend())"):
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORSLIM_THREADS", "TENSORSLIM_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", script], env=dict(env, **env_extra),
                         capture_output=True, text=True, check=True)
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not loaded_openmp_runtime(), reason="torch loaded no OpenMP runtime")
def test_torchs_team_by_default_own_pool_on_request():
    assert _backend({}) == "host openmp"
    assert _backend({"TENSORSLIM_THREADS": "auto"}) == "host openmp"
    assert _backend({"TENSORSLIM_THREADS": "own"}) == "own pool"
    # A thread count for the core asks for its own pool.
    assert _backend({"TENSORSLIM_NUM_THREADS": "1"}) == "own pool"


@pytest.mark.skipif(not loaded_openmp_runtime(), reason="torch loaded no OpenMP runtime")
def test_forked_child_leaves_torchs_team():
    # libgomp's team does not survive fork: a child that ran a region on it would hang.
    script = ("import os, torch, tensorslim as ts\n"
              "before = ts._C.threading_backend()\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    os._exit(0 if ts._C.threading_backend() == 'own pool' else 3)\n"
              "_, status = os.waitpid(pid, 0)\n"
              "print(before, os.waitstatus_to_exitcode(status))")
    assert _backend({}, script) == "host openmp 0"


@pytest.mark.skipif(not loaded_openmp_runtime(), reason="torch loaded no OpenMP runtime")
def test_torch_thread_setting_governs_the_shared_team(tmp_path):
    script = ("import torch, tensorslim as ts; torch.set_num_threads(1); "
              "print(ts._C.threading_backend(), ts._C.num_threads())")
    env = dict(os.environ, TENSORSLIM_THREADS="openmp")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert res.stdout.split() == ["host", "openmp", "1"]


@pytest.mark.skipif(not loaded_openmp_runtime(), reason="torch loaded no OpenMP runtime")
def test_both_thread_backends_give_identical_results(tmp_path):
    own_name, own = _run(tmp_path, "own")
    omp_name, omp = _run(tmp_path, "openmp")
    assert (own_name, omp_name) == ("own pool", "host openmp")
    for a, b in zip(own, omp):
        assert torch.equal(a, b)


@pytest.mark.skipif(not loaded_openmp_runtime(), reason="torch loaded no OpenMP runtime")
def test_errors_cross_the_openmp_region(tmp_path):
    script = ("import torch, tensorslim as ts\nx = torch.randn(4096, 256)\nx[3000, 7] = float('nan')\n"
              "try:\n    ts.ops.quantize(x, 'int8', 256, backend='native')\n"
              "except ValueError as e:\n    print('ValueError', e)\n")
    env = dict(os.environ, TENSORSLIM_THREADS="openmp")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert res.stdout.startswith("ValueError") and "row 3000" in res.stdout


def test_errors_cross_the_parallel_region():
    x = torch.randn(4096, 256)
    x[3000, 7] = float("nan")
    with pytest.raises(ValueError, match="row 3000"):
        ts.ops.quantize(x, "int8", 256, backend="native")


def test_bad_threads_setting_is_rejected():
    env = dict(os.environ, TENSORSLIM_THREADS="fast")
    res = subprocess.run([sys.executable, "-c", "import tensorslim"], env=env, capture_output=True,
                         text=True)
    assert res.returncode != 0 and "TENSORSLIM_THREADS must be 'auto', 'own' or 'openmp'" in res.stderr


RESIZE_SCRIPT = r"""
import threading, torch, tensorslim as ts
from tensorslim._native import _C
torch.manual_seed(0)
qw = torch.randint(-128, 128, (2048, 1024), dtype=torch.int8)
qx = torch.randint(0, 256, (4, 1024), dtype=torch.uint8)
args = (qx, torch.full((1,), 0.01), 120, qw, torch.rand(2048), None)
want = ts.ops.linear_int8(*args, backend="native")  # on the core's threads, every AVX2+ CPU
done, wrong = threading.Event(), []

def run():
    while not done.is_set():
        if not torch.equal(ts.ops.linear_int8(*args, backend="native"), want):
            wrong.append(1)

threads = [threading.Thread(target=run) for _ in range(2)]
before = _C.num_threads()
for t in threads:
    t.start()
try:
    for n in [1, 3, 2, 4] * 5:  # workers are never stopped in the middle of a region
        _C.set_num_threads(n)
finally:
    done.set()
    for t in threads:
        t.join(timeout=30)
    _C.set_num_threads(before)
print(_C.threading_backend(), not any(t.is_alive() for t in threads) and not wrong)
"""


@pytest.mark.parametrize("threads", ["own", "auto"])
def test_resizing_the_pool_while_other_threads_run_kernels(threads):
    # Own pool: resized under running kernels. Torch's team: two callers at once.
    res = subprocess.run([sys.executable, "-c", RESIZE_SCRIPT], env=dict(os.environ, TENSORSLIM_THREADS=threads),
                         capture_output=True, text=True, check=True, timeout=300)
    assert res.stdout.split()[-1] == "True"
