"""Weight-only linear: torch fp32 F.linear against tensorslim INT8 / INT4 g128, one run.

For each (K, N) and batch M it prints the median time of each, the speed-up over fp32,
and the fraction of the memory-bandwidth bound: (bytes the product must move) /
(copy bandwidth measured in this run) divided by the measured time.

    python benchmarks/bench_linear.py [--shapes 4096x4096,4096x11008] [--batches 1,8,64]
"""
import argparse
import time

import torch
import torch.nn.functional as F

import tensorslim as ts
from tensorslim import ops
from timing import copy_bandwidth, cpu_name, timeit


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN list")
    p.add_argument("--batches", default="1,8,64")
    args = p.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
          f"tensorslim ISA {ts._C.active_isa()}, {ts._C.num_threads()} tensorslim threads")
    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s\n")
    header = (f"{'K x N':>12} {'M':>3} | {'fp32 ms':>8} | {'int8 ms':>8} {'x fp32':>7} {'%bw':>5} "
              f"| {'int4 ms':>8} {'x fp32':>7} {'%bw':>5} | {'int4 oneDNN ms':>14}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K)
        q8 = ops.quantize(w, "int8", K)
        q4 = ops.quantize(w, "int4", 128)
        for M in (int(v) for v in args.batches.split(",")):
            x = torch.randn(M, K)
            act_bytes = 4 * M * (K + N)
            t32 = timeit(lambda: F.linear(x, w))
            t8 = timeit(lambda: ops.linear_weight_only(x, *q8, None, "int8", K, K))
            t4 = timeit(lambda: ops.linear_weight_only(x, *q4, None, "int4", 128, K))
            t4d = timeit(lambda: ops.linear_weight_only(x, *q4, None, "int4", 128, K, backend="onednn"))
            b8 = N * K + 4 * N + act_bytes
            b4 = N * K // 2 + 4 * N * K // 128 + act_bytes
            print(f"{K:>5} x {N:<5} {M:>3} | {t32 * 1e3:8.3f} | {t8 * 1e3:8.3f} {t32 / t8:6.2f}x "
                  f"{100 * b8 / bw / t8:4.0f}% | {t4 * 1e3:8.3f} {t32 / t4:6.2f}x {100 * b4 / bw / t4:4.0f}% "
                  f"| {t4d * 1e3:14.3f}")


if __name__ == "__main__":
    main()
