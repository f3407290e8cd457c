"""Compressed layers keep working in forked children and with odd thread settings.

fork() copies only the calling thread: a child used to wait forever on the parent's pool
workers, or on the oneDNN runtime threads its stream waits for. Children now start their
own pool and run our kernels instead of oneDNN. Each child runs under a timeout, so a
regression fails here instead of hanging the suite."""
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tensorslim as ts

RECIPES = ["int8", "int4", "nvfp4", "int8_dynamic", "w4a8", "binary", "ternary"]


def _model(preset):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    ts.quantize(m, preset)
    return m


def _child(m, x, y, q):
    q.put(bool(torch.allclose(m(x), y, rtol=1e-4, atol=1e-4)))


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("preset", RECIPES)
def test_forked_child_runs_a_layer_the_parent_ran(preset, batch):
    m = _model(preset)
    x = torch.randn(batch, 256)
    with torch.no_grad():
        y = m(x)  # starts our pool and, at batch 32, oneDNN in the parent
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(m, x, y, q))
        p.start()
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            pytest.fail(f"{preset}: the forked child hung")
        assert p.exitcode == 0
        assert q.get(timeout=5), f"{preset}: the child's output differs from the parent's"


class _Embeddings(torch.utils.data.Dataset):
    def __init__(self, model):
        self.model = model

    def __len__(self):
        return 8

    def __getitem__(self, i):
        with torch.no_grad():
            return self.model(torch.full((4, 256), float(i) / 8))


def test_dataloader_workers_run_compressed_layers():
    m = _model("int8_dynamic")
    with torch.no_grad():
        want = torch.stack([m(torch.full((4, 256), float(i) / 8)) for i in range(8)])
    loader = torch.utils.data.DataLoader(_Embeddings(m), batch_size=4, num_workers=2,
                                         multiprocessing_context="fork", timeout=60)
    got = torch.cat(list(loader))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def _threads_in(env_value):
    code = ("import warnings, os, tensorslim as ts\n"
            "print(ts._C.num_threads(), len(os.sched_getaffinity(0)))")
    env = dict(os.environ, TENSORSLIM_NUM_THREADS=env_value)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                          capture_output=True, text=True, timeout=60)


def test_thread_count_is_clamped_to_usable_cpus_with_a_warning():
    res = _threads_in("100000")
    assert res.returncode == 0, res.stderr
    threads, cpus = map(int, res.stdout.split())
    assert threads == cpus
    assert "exceeds the" in res.stderr


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_bad_thread_counts_fall_back_to_the_cpus(value):
    res = _threads_in(value)
    assert res.returncode == 0, res.stderr
    threads, cpus = map(int, res.stdout.split())
    assert threads == cpus
    assert "not a positive integer" in res.stderr


def test_set_num_threads_clamps():
    # The own pool's size (torch's team, the default, follows torch.set_num_threads).
    script = ("import os, tensorslim as ts\n"
              "ts._C.set_num_threads(10 ** 6)\n"
              "a = ts._C.num_threads() == len(os.sched_getaffinity(0))\n"
              "ts._C.set_num_threads(0)\n"
              "print(ts._C.threading_backend(), a, ts._C.num_threads() == 1)")
    res = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TENSORSLIM_THREADS="own"),
                         capture_output=True, text=True, check=True, timeout=120)
    assert res.stdout.split() == ["own", "pool", "True", "True"]
