"""W8A8 linear layers on the CPU: torch fp32 F.linear, torch's own dynamic INT8
(torch.ao.quantization.quantize_dynamic, when the installed torch has it), and ours
(static W8A8 and per-token dynamic), K = N = 4096, measured in one run; ratios vs fp32.

    .venv/bin/python benchmarks/bench_w8a8.py [--k 4096] [--n 4096] [--batches 1 32 128 512]
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from timing import timeit


def torch_dynamic(linear):
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    try:
        return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    except Exception as e:  # e.g. no quantized engine in this build
        print(f"torch dynamic int8 unavailable: {e}")
        return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 512])
    args = p.parse_args()
    torch.manual_seed(0)
    K, N = args.k, args.n
    linear = nn.Linear(K, N).eval()
    calib = [torch.randn(64, K)]
    static = nn.Sequential(nn.Linear(K, N))
    static[0].load_state_dict(linear.state_dict())
    ts.quantize(static, ts.W8A8(smoothquant=False, skip_output_head=False), calib_data=calib, progress=False)
    dynamic = nn.Sequential(nn.Linear(K, N))
    dynamic[0].load_state_dict(linear.state_dict())
    ts.quantize(dynamic, ts.Int8Dynamic(skip_output_head=False), progress=False)
    tdyn = torch_dynamic(nn.Linear(K, N).eval().requires_grad_(False))
    if tdyn is not None:
        tdyn[0].set_weight_bias(torch.quantize_per_channel(linear.weight.detach(),
                                                           linear.weight.detach().abs().amax(1) / 127,
                                                           torch.zeros(N, dtype=torch.long), 0, torch.qint8),
                                linear.bias.detach())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (tensorslim: "
          f"{ts._C.threading_backend()}, ISA {ts._C.active_isa()}), K={K} N={N}")
    head = f"{'batch':>6} {'fp32 ms':>9} {'torch-dyn ms':>13} {'ours-static ms':>15} {'ours-dyn ms':>12} " \
           f"{'static/fp32':>12} {'dyn/fp32':>9} {'dyn/torch-dyn':>14}  {'GOPS static':>11}"
    print(head)
    with torch.inference_mode():
        for M in args.batches:
            x = torch.randn(M, K)
            t32 = timeit(lambda: F.linear(x, linear.weight, linear.bias))
            ttd = timeit(lambda: tdyn(x)) if tdyn is not None else float("nan")
            tst = timeit(lambda: static(x))
            tdy = timeit(lambda: dynamic(x))
            print(f"{M:>6} {t32 * 1e3:>9.3f} {ttd * 1e3:>13.3f} {tst * 1e3:>15.3f} {tdy * 1e3:>12.3f} "
                  f"{t32 / tst:>11.2f}x {t32 / tdy:>8.2f}x {ttd / tdy:>13.2f}x  {2 * M * K * N / tst / 1e9:>11.1f}")


if __name__ == "__main__":
    main()
