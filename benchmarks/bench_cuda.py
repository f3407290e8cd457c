"""CUDA kernels against the GPU's limits: runs the C++ benchmark tensorslim_cuda_bench
(benchmarks/cuda_bench.cpp) and prints its table. Needs no CUDA build of torch: the
binary links only the CUDA runtime (and cuBLAS for the fp16 baseline when found).

What it measures (CUDA events, median of 25 samples after warm-up): device copy
bandwidth; cuda::quantize on 8192x8192 fp16/fp32 as a fraction of it (target >= 70%);
linear_weight_only INT4 g128 / INT8 per row at M = 1, 8, 64 against cuBLAS fp16 (target:
INT4 M=1 >= 3x cuBLAS fp16).

    python benchmarks/bench_cuda.py [--binary PATH]

The binary comes from `make build` (build/<tag>/tensorslim_cuda_bench, when nvcc is
found) or from tests/cuda/build_standalone.sh (build/cuda-standalone/). Without a CUDA
device it prints "no CUDA device: skipped" and exits 0.
"""
import argparse
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tensorslim_cuda_bench"
SKIP_LINE = "no CUDA device: skipped"


def find_binary():
    """The newest tensorslim_cuda_bench under build/*/, or None."""
    found = [p for p in glob.glob(os.path.join(ROOT, "build", "*", NAME)) if os.access(p, os.X_OK)]
    return max(found, key=os.path.getmtime) if found else None


def gpu_visible():
    """Whether the machine shows an NVIDIA GPU (device nodes or nvidia-smi)."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and "GPU" in res.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", help=f"path to {NAME} (default: build/*/{NAME})")
    args = ap.parse_args(argv)

    binary = args.binary or find_binary()
    if binary is None:
        if not gpu_visible():
            print(SKIP_LINE)
            return 0
        print(f"{NAME} not found under build/*/: build with CUDA (`make build` where nvcc is "
              "found, or tests/cuda/build_standalone.sh)", file=sys.stderr)
        return 1
    shown = os.path.relpath(binary, ROOT) if binary.startswith(ROOT + os.sep) else binary
    print(f"running {shown}", flush=True)
    # The binary prints the skip line itself (exit 0) when the runtime sees no device.
    return subprocess.run([binary]).returncode


if __name__ == "__main__":
    sys.exit(main())
