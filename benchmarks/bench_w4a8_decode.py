"""W4A8 at decoding sizes with the weights read from memory, against ONNX Runtime: L square
layers called in turn (a model's decoding step; L x K x K INT4 weights, more than the L3 by
default), so no layer finds its weights in cache. Ours: a stack of W4A8Linear (int4 g128, each
with its packed copy); ORT: one session with L MatMulNBits nodes (int4, block 128, accuracy
level 4: int8 activations, its W4A8; same weights), fp32 nn.Linear stack as the baseline.
Median of interleaved rounds; ms per layer and the ratios. Needs onnxruntime + onnx for the
ORT column.

    .venv/bin/python benchmarks/bench_w4a8_decode.py [--k 4096] [--layers 8] [--batches 1 2 4 8] [--isa avx2]
"""
import argparse

from isa_option import add_argument as add_isa_argument, cap_from_argv, check as check_isa

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tensorslim as ts  # noqa: E402
from ort_peer import make_int4_chain  # noqa: E402
from timing import cpu_name, median_times  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of interleaved rounds per batch")
    add_isa_argument(p)
    args = p.parse_args()
    isa_line = check_isa(args)
    torch.manual_seed(0)
    K, L = args.k, args.layers
    fp32 = nn.Sequential(*[nn.Linear(K, K, bias=False) for _ in range(L)]).eval()
    ours = nn.Sequential(*[nn.Linear(K, K, bias=False) for _ in range(L)]).eval()
    ours.load_state_dict(fp32.state_dict())
    ts.quantize(ours, ts.W4A8(group_size=128, skip_output_head=False), progress=False)
    ort = make_int4_chain([(m.qweight, m.scales) for m in ours], K, 4, torch.get_num_threads())
    mib = L * K * K / 2 / 2**20
    print(f"{cpu_name()}; torch {torch.__version__}, threads {torch.get_num_threads()}, tensorslim threads "
          f"{ts._C.num_threads()}; {L} layers {K} x {K}, {mib:.3g} MiB of INT4 weights; W4A8 kernel "
          f"{ts.ops.w4a8.kernel_name(K, 128)}; {isa_line}")
    if ort is None:
        print("onnxruntime / onnx not installed: its column shows nan")
    print(f"{'batch':>6} {'fp32 ms/layer':>14} {'ORT L4 ms/layer':>16} {'ours ms/layer':>14} "
          f"{'x fp32':>8} {'x ORT L4':>9} {'max diff':>9}")
    with torch.inference_mode():
        for M in args.batches:
            x = torch.randn(M, K)
            xn = x.numpy()
            fns = [lambda: fp32(x), lambda: ours(x)] + ([lambda: ort(xn)] if ort else [])
            times = median_times(fns, min_time=args.min_time)
            t32, tw = times[0], times[1]
            to = times[2] if ort else float("nan")
            diff = float("nan")
            if ort:  # both quantize activations to int8 (ORT per block, ours per token): close, not equal
                y, yo = ours(x), torch.from_numpy(ort(xn))
                diff = float((y - yo).abs().max() / y.abs().max())
            print(f"{M:>6} {t32 / L * 1e3:>14.3f} {to / L * 1e3:>16.3f} {tw / L * 1e3:>14.3f} "
                  f"{t32 / tw:>7.2f}x {to / tw:>8.2f}x {diff:>9.1e}")


if __name__ == "__main__":
    main()
