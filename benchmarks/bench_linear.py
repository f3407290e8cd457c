"""Weight-only linear: torch fp32 F.linear against tensorslim INT8 / INT4 g128, one run.

For each (K, N) and batch M it prints the median time of each, the speed-up over fp32,
and the fraction of the memory-bandwidth bound: (bytes the product must move) /
(copy bandwidth measured in this run) divided by the measured time; then each backend that
`auto` chooses between (our native kernels, oneDNN), so the dispatch rule can be read off,
and both native calls once more with the activation-pieces kernels switched off (the float
kernels they replace at a few rows, src/cpu/activation_pieces.h).
MiniLM's shapes: --shapes 384x384,384x1536,1536x384 --batches 1,8,16,32,160,640
--ort adds ONNX Runtime's MatMulNBits on the same INT4 g128 weight (accuracy_level 0 and 4;
benchmarks/ort_peer.py, needs onnxruntime + onnx) and its largest difference from ours, and our
W4A8 layer on that weight: accuracy_level 4 quantizes the activations to int8 too, so W4A8 is
its like-for-like (level 0 is our INT4 weight-only's).

    python benchmarks/bench_linear.py [--shapes 4096x4096,4096x11008] [--batches 1,8,64] [--isa avx2] [--ort]
"""
import argparse

from isa_option import add_argument as add_isa_argument, cap_from_argv, check as check_isa

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tensorslim import W4A8Linear, _C, ops  # noqa: E402
from ort_peer import make_int4_matmul  # noqa: E402
from timing import copy_bandwidth, cpu_name, timeit  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN list")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--ort", action="store_true", help="ONNX Runtime MatMulNBits on the INT4 weight")
    add_isa_argument(p)
    args = p.parse_args()
    isa_line = check_isa(args)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, {isa_line}, "
          f"{_C.num_threads()} tensorslim threads ({_C.threading_backend()})")
    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s\n")
    header = (f"{'K x N':>12} {'M':>3} | {'fp32 ms':>8} | {'int8 ms':>8} {'x fp32':>7} {'%bw':>5} "
              f"| {'int4 ms':>8} {'x fp32':>7} {'%bw':>5} | native / oneDNN ms: {'int8':>15} {'int4':>15} "
              f"| no pieces ms: int8 / int4")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K)
        q8 = ops.quantize(w, "int8", K)
        q4 = ops.quantize(w, "int4", 128)
        ort = {lvl: make_int4_matmul(q4[0], q4[1], K, N, lvl, torch.get_num_threads()) for lvl in (0, 4)} \
            if args.ort else {}
        if args.ort and ort[0] is None:
            raise SystemExit("--ort needs `pip install onnxruntime onnx`")
        for M in (int(v) for v in args.batches.split(",")):
            x = torch.randn(M, K)
            act_bytes = 4 * M * (K + N)
            t32 = timeit(lambda: F.linear(x, w))
            t8 = timeit(lambda: ops.linear_weight_only(x, *q8, None, "int8", K, K))
            t4 = timeit(lambda: ops.linear_weight_only(x, *q4, None, "int4", 128, K))
            backends = {}
            for name, q, fmt, g in (("int8", q8, "int8", K), ("int4", q4, "int4", 128)):
                for be in ("native", "onednn"):
                    try:
                        backends[name, be] = timeit(
                            lambda: ops.linear_weight_only(x, *q, None, fmt, g, K, backend=be))
                    except ValueError:  # no kernel of that backend takes this shape
                        backends[name, be] = float("nan")
            _C.set_activation_pieces_enabled(False)
            t8_float = timeit(lambda: ops.linear_weight_only(x, *q8, None, "int8", K, K, backend="native"))
            t4_float = timeit(lambda: ops.linear_weight_only(x, *q4, None, "int4", 128, K, backend="native"))
            _C.set_activation_pieces_enabled(True)
            b8 = N * K + 4 * N + act_bytes
            b4 = N * K // 2 + 4 * N * K // 128 + act_bytes
            print(f"{K:>5} x {N:<5} {M:>3} | {t32 * 1e3:8.3f} | {t8 * 1e3:8.3f} {t32 / t8:6.2f}x "
                  f"{100 * b8 / bw / t8:4.0f}% | {t4 * 1e3:8.3f} {t32 / t4:6.2f}x {100 * b4 / bw / t4:4.0f}% "
                  f"| {'':19}" + "".join(f"{backends[n, 'native'] * 1e3:7.3f} / {backends[n, 'onednn'] * 1e3:5.3f} "
                                         for n in ("int8", "int4")) + f"| {t8_float * 1e3:7.3f} / {t4_float * 1e3:5.3f}")
            if ort:
                xn = x.numpy()
                ours = ops.linear_weight_only(x, *q4, None, "int4", 128, K)
                cells, ort_t = [], {}
                for lvl, run in ort.items():
                    t = ort_t[lvl] = timeit(lambda: run(xn))
                    diff = float((torch.from_numpy(run(xn)) - ours).abs().max() / ours.abs().max())
                    cells.append(f"accuracy_level {lvl} {t * 1e3:.3f} ms (ours {t / t4:.2f}x its speed, "
                                 f"max diff {diff:.1e})")
                # The layer, which keeps its weights packed for the kernel (as ORT keeps its prepacked B).
                w4a8 = W4A8Linear(K, N, "int4", 128, bias=False)
                w4a8.qweight.copy_(q4[0])
                w4a8.scales.copy_(q4[1])
                with torch.no_grad():
                    t_w4a8 = timeit(lambda: w4a8(x))
                print(f"{'':>16} ORT MatMulNBits int4 g128: " + "; ".join(cells))
                print(f"{'':>16} our W4A8 (int8 activations per token) {t_w4a8 * 1e3:.3f} ms: "
                      f"{ort_t[4] / t_w4a8:.2f}x ORT accuracy_level 4's speed")


if __name__ == "__main__":
    main()
