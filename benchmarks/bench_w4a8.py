"""W4A8 linear layers on the CPU: torch fp32 F.linear, our INT4 weight-only (int4 g128),
our Int8Dynamic (INT8 weights, per-token INT8 activations) and our W4A8 (int4 g128 weights,
per-token INT8 activations, integer group dots), K = N = 4096, measured in one run in
interleaved rounds (so load from other processes hits all alike); ratios of W4A8 to each.

    .venv/bin/python benchmarks/bench_w4a8.py [--k 4096] [--n 4096] [--batches 1 8 32 128] [--threads N] [--isa avx2]
"""
import argparse

from isa_option import add_argument as add_isa_argument, cap_from_argv, check as check_isa

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from timing import cpu_name, median_times


def quantized(linear, cfg):
    model = nn.Sequential(nn.Linear(linear.in_features, linear.out_features))
    model[0].load_state_dict(linear.state_dict())
    ts.quantize(model, cfg, progress=False)
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of interleaved rounds per batch")
    p.add_argument("--threads", type=int, default=0,
                   help="threads for torch and tensorslim alike (0: leave the defaults)")
    add_isa_argument(p)
    args = p.parse_args()
    isa_line = check_isa(args)
    if args.threads:  # e.g. 1 on a shared machine, where one busy core stalls every 2-thread call
        torch.set_num_threads(args.threads)
        ts._C.set_num_threads(args.threads)
    torch.manual_seed(0)
    K, N = args.k, args.n
    linear = nn.Linear(K, N).eval()
    int4 = quantized(linear, ts.Int4WeightOnly(group_size=128, skip_output_head=False))
    int8 = quantized(linear, ts.Int8Dynamic(skip_output_head=False))
    w4a8 = quantized(linear, ts.W4A8(group_size=128, skip_output_head=False))
    print(f"{cpu_name()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"tensorslim threads {ts._C.num_threads()} ({ts._C.threading_backend()}), K={K} N={N}, "
          f"W4A8 kernel: {ts.ops.w4a8.kernel_name(K, 128)}; {isa_line}")
    print(f"{'batch':>6} {'fp32 ms':>9} {'int4-wo ms':>11} {'int8-dyn ms':>12} {'w4a8 ms':>9} "
          f"{'w4a8/fp32':>10} {'w4a8/int4-wo':>13} {'w4a8/int8-dyn':>14} {'GOPS w4a8':>10}")
    with torch.inference_mode():
        for M in args.batches:
            x = torch.randn(M, K)
            t32, t4, t8, tw = median_times([lambda: F.linear(x, linear.weight, linear.bias),
                                            lambda: int4(x), lambda: int8(x), lambda: w4a8(x)],
                                           min_time=args.min_time)
            print(f"{M:>6} {t32 * 1e3:>9.3f} {t4 * 1e3:>11.3f} {t8 * 1e3:>12.3f} {tw * 1e3:>9.3f} "
                  f"{t32 / tw:>9.2f}x {t4 / tw:>12.2f}x {t8 / tw:>13.2f}x {2 * M * K * N / tw / 1e9:>10.1f}")


if __name__ == "__main__":
    main()
