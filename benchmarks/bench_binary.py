"""Binary / ternary / XNOR linears against torch fp32 F.linear, measured in one run.

For each (K, N) and batch M: the median time of fp32 F.linear, of our binary-weight
linear (float activations, 1 bit per weight), ternary (2 bits), and XNOR (binary
activations and weights, popcount), with each one's speed-up over fp32. The weight
bytes each reads per call are printed too (fp32: 4 bytes per weight, binary 1/8).

    python benchmarks/bench_binary.py [--shapes 4096x4096] [--batches 1,8,64] [--threads N] [--isa avx2]

--threads sets torch's and tensorslim's thread counts alike (default: leave both as they are).
On a shared machine the per-call thread wake-up can dominate small calls; --threads 1
measures the kernels themselves.
"""
import argparse

from isa_option import add_argument as add_isa_argument, cap_from_argv, check as check_isa

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402
import torch.nn.functional as F

import tensorslim as ts
from tensorslim.ops import binary as B
from timing import cpu_name, median_times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096", help="comma-separated KxN")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--threads", type=int, default=0, help="threads for torch and tensorslim (0: as is)")
    add_isa_argument(p)
    args = p.parse_args()
    isa_line = check_isa(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        ts._C.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, {ts._C.num_threads()} "
          f"tensorslim threads ({ts._C.threading_backend()}), VPOPCNTDQ {'yes' if ts._C.has_vpopcntdq() else 'no'}; {isa_line}")
    head = (f"{'K x N':>11} {'M':>3} | {'fp32 ms':>8} | {'binary ms':>9} {'x fp32':>7} | {'ternary ms':>10} "
            f"{'x fp32':>7} | {'xnor ms':>8} {'x fp32':>7}")
    print(head)
    print("-" * len(head))
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K)
        bias = torch.randn(N)
        bits, bscale = B.binarize(w)
        codes, tscale = B.ternarize(w)
        for M in (int(v) for v in args.batches.split(",")):
            x = torch.randn(M, K)
            t32, tb, tt, tx = median_times([
                lambda: F.linear(x, w, bias),
                lambda: B.binary_linear(x, bits, bscale, bias, K),
                lambda: B.ternary_linear(x, codes, tscale, bias, K),
                lambda: B.xnor_linear(x, bits, bscale, bias, K)])
            print(f"{K:>5} x {N:<5} {M:>3} | {t32 * 1e3:8.3f} | {tb * 1e3:9.3f} {t32 / tb:6.2f}x | "
                  f"{tt * 1e3:10.3f} {t32 / tt:6.2f}x | {tx * 1e3:8.3f} {t32 / tx:6.2f}x")
        print(f"{'':>15} weight bytes per call: fp32 {4 * N * K / 2**20:.1f} MiB, binary "
              f"{bits.numel() / 2**20:.2f} MiB, ternary {codes.numel() / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
