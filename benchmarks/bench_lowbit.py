"""Low-bit linears: torch fp32 F.linear against tensorslim FP8 / NVFP4 / MXFP4 / INT3 / INT2
weights (decode fused into the product), measured in one run.

For each (K, N), batch M and format it prints the median time, the speed-up over fp32
and the fraction of the memory-bandwidth bound: (bytes the product must move: packed
weight + scales + activations) / (copy bandwidth measured in this run) / time.

    python benchmarks/bench_lowbit.py [--shapes 4096x4096] [--batches 1,8] [--formats ...] [--isa avx2]
"""
import argparse
import os
import time

from isa_option import add_argument as add_isa_argument, cap_from_argv, check as check_isa

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402
import torch.nn.functional as F


import tensorslim as ts
from tensorslim import ops
from tensorslim.formats import get_format
from timing import copy_bandwidth, cpu_name, timeit

# format -> group size used here (FP8: one scale per output row)
FORMATS = {"fp8_e4m3": None, "fp8_e5m2": None, "nvfp4": 16, "mxfp4": 32, "int3": 128, "int2": 128}


def weight_bytes(q, s, z, t) -> int:
    return sum(v.numel() * v.element_size() for v in (q, s, z, t) if v is not None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096", help="KxN list")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--threads", type=int, default=0, help="torch and tensorslim threads (0: as set)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by this thread's CPU time (with --threads 1: immune to other load)")
    add_isa_argument(p)
    args = p.parse_args()
    isa_line = check_isa(args)
    clock = time.perf_counter
    if args.cpu_time:
        if args.threads != 1:
            p.error("--cpu-time needs --threads 1 (only the calling thread is measured)")
        clock = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
        ts._C.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
          f"{ts._C.num_threads()} tensorslim threads ({ts._C.threading_backend()}); {isa_line}")
    print(f"clock: {'thread CPU time' if args.cpu_time else 'wall'}; "
          f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f} "
          "(other work on the machine inflates every time)\n")
    header = f"{'K x N':>12} {'M':>3} {'format':>9} | {'fp32 ms':>8} {'%bw':>5} | {'ours ms':>8} {'x fp32':>7} {'%bw':>5} | {'MiB':>6}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K)
        packed = {}
        for fmt in args.formats.split(","):
            group = FORMATS.get(fmt) or K
            packed[fmt] = (group, ops.quantize_lowbit(w, fmt, group))
        for M in (int(v) for v in args.batches.split(",")):
            x = torch.randn(M, K)
            act_bytes = 4 * M * (K + N)
            t32 = timeit(lambda: F.linear(x, w), clock=clock)
            b32 = 4 * N * K + act_bytes
            for fmt, (group, (q, s, z, t)) in packed.items():
                tq = timeit(lambda: ops.linear_lowbit(x, q, s, z, t, None, fmt, group, K), clock=clock)
                b = weight_bytes(q, s, z, t) + act_bytes
                print(f"{K:>5} x {N:<5} {M:>3} {fmt:>9} | {t32 * 1e3:8.3f} {100 * b32 / bw / t32:4.0f}% | "
                      f"{tq * 1e3:8.3f} {t32 / tq:6.2f}x {100 * b / bw / tq:4.0f}% | "
                      f"{weight_bytes(q, s, z, t) / 2**20:6.2f}")
    print(f"\nfp32 weight: {4 * N * K / 2**20:.2f} MiB; spec: {[get_format(f).name for f in packed]}")


if __name__ == "__main__":
    main()
