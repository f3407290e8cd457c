"""W8A8 linear layers on the CPU: torch fp32 F.linear, torch's own dynamic INT8
(torch.ao.quantization.quantize_dynamic, when the installed torch has it), torchao's
Int8DynamicActivationInt8WeightConfig (when torchao is installed), and ours (static W8A8 and
per-token dynamic), K = N = 4096, measured in one run (interleaved rounds, medians); ratios vs fp32.

    .venv/bin/python benchmarks/bench_w8a8.py [--k 4096] [--n 4096] [--batches 1 32 128 512] [--isa avx2]

torch's dynamic INT8 runs on fbgemm, which picks its kernels from the CPU itself: --isa caps
ours, oneDNN, MKL and ATen, not fbgemm. torchao is optional: `pip install --no-deps torchao`
next to the pinned torch (0.18.0 imports with torch 2.13; its CUDA extensions fail to load
on a CPU build, which it reports and works without).
"""
import argparse

from isa_option import add_argument as add_isa_argument, cap_from_argv, check as check_isa

cap_from_argv()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import tensorslim as ts  # noqa: E402
from timing import median_times  # noqa: E402


def copy_of(linear):
    twin = nn.Linear(linear.in_features, linear.out_features).eval().requires_grad_(False)
    twin.load_state_dict(linear.state_dict())
    return twin


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


def torchao_dynamic(linear):
    """torchao's dynamic int8 x int8 linear (eager, as users call it), or None without torchao."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception:  # not installed, or a version that does not import with this torch
        return None
    model = nn.Sequential(linear)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 512])
    add_isa_argument(p)
    args = p.parse_args()
    isa_line = check_isa(args)
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
    tao = torchao_dynamic(copy_of(linear))
    if tao is None:
        print("torchao not installed (pip install --no-deps torchao): its column shows nan")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (tensorslim: "
          f"{ts._C.threading_backend()}), {isa_line}, K={K} N={N}")
    head = f"{'batch':>6} {'fp32 ms':>9} {'torch-dyn ms':>13} {'ours-static ms':>15} {'ours-dyn ms':>12} " \
           f"{'torchao ms':>11} {'static/fp32':>12} {'dyn/fp32':>9} {'dyn/torch-dyn':>14} {'dyn/torchao':>12}" \
           f"  {'GOPS static':>11}"
    print(head)
    with torch.inference_mode():
        for M in args.batches:
            x = torch.randn(M, K)
            fns = [lambda: F.linear(x, linear.weight, linear.bias), lambda: static(x), lambda: dynamic(x)]
            peers = [f for f in ((lambda: tdyn(x)) if tdyn is not None else None,
                                 (lambda: tao(x)) if tao is not None else None) if f is not None]
            t32, tst, tdy, *rest = median_times(fns + peers)
            ttd = rest.pop(0) if tdyn is not None else float("nan")
            tta = rest.pop(0) if tao is not None else float("nan")
            print(f"{M:>6} {t32 * 1e3:>9.3f} {ttd * 1e3:>13.3f} {tst * 1e3:>15.3f} {tdy * 1e3:>12.3f} "
                  f"{tta * 1e3:>11.3f} {t32 / tst:>11.2f}x {t32 / tdy:>8.2f}x {ttd / tdy:>13.2f}x {tta / tdy:>11.2f}x"
                  f"  {2 * M * K * N / tst / 1e9:>11.1f}")


if __name__ == "__main__":
    main()
