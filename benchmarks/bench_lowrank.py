"""Low-rank factorization, measured in one run:

1. The SVD itself: our C++ core (Eigen's divide-and-conquer SVD; the randomized SVD for a
   large matrix at a given rank) against torch.linalg.svd (and torch.svd_lowrank for the
   randomized case) on the same fp32 matrices, median seconds and the ratio.
2. The digits ResNet (tensorslim.eval.digits_basic_resnet, width 32 at 16x16) trained for a few
   epochs, Tucker-2 at a chosen FLOP ratio (stem and 1x1 shortcuts left dense), accuracy
   dense / factorized / after a short fine-tune, and inference latency of the dense and the
   factorized model on one batch, with the speed-up.

    python benchmarks/bench_lowrank.py [--flop-ratio 0.5] [--threads N] [--skip-svd] [--skip-cnn] [--quick]
"""
import argparse
import copy
import os
import time

import torch

import tensorslim as ts
from tensorslim import _C
from tensorslim.eval import digits_basic_resnet
from tensorslim.ops import lowrank as L
from timing import cpu_name, median_times

# (rows, cols, rank for the randomized SVD or None for the exact one)
SVD_CASES = [(768, 768, None), (1024, 4096, None), (4096, 4096, 256)]


def bench_svd(cases):
    print("| matrix | ours | ours (s) | torch (s) | torch / ours |")
    print("|---|---|---|---|---|")
    for rows, cols, rank in cases:
        w = torch.randn(rows, cols)
        if rank is None:
            ours = (lambda: L.svd(w), "BDCSVD exact")
            theirs = lambda: torch.linalg.svd(w, full_matrices=False)  # noqa: E731
        else:
            ours = (lambda: L.svd_randomized(w, rank, oversample=10, power_iters=2),
                    f"randomized rank {rank}")
            theirs = lambda: torch.svd_lowrank(w, q=rank + 10, niter=2)  # noqa: E731
        t_ours, t_torch = median_times([ours[0], theirs], min_time=0.0, warmup=1, min_rounds=3)
        print(f"| {rows}x{cols} | {ours[1]} | {t_ours:.3f} | {t_torch:.3f} | {t_torch / t_ours:.2f} |",
              flush=True)
        if rank is not None:  # the exact alternative a user would otherwise run
            t_full = median_times([lambda: torch.linalg.svd(w, full_matrices=False)], min_time=0.0,
                                  warmup=0, min_rounds=1)[0]
            print(f"| {rows}x{cols} | randomized vs torch.linalg.svd exact | {t_ours:.3f} | {t_full:.3f} | "
                  f"{t_full / t_ours:.2f} |", flush=True)


def bench_cnn(flop_ratio: float, epochs: int, batch: int, width: int):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_basic_resnet.digits_images()
    t0 = time.perf_counter()
    dense = digits_basic_resnet.train(digits_basic_resnet.DigitsResNet(width=width, size=16), xtr, ytr, epochs)
    print(f"trained {epochs} epochs in {time.perf_counter() - t0:.1f} s")
    fact = copy.deepcopy(dense)
    report = ts.factorize(fact, ts.Tucker(ratio=flop_ratio, exclude=("stem.*", "*.shortcut.*")), progress=False)
    print(report)
    acc_dense, acc_fact = digits_basic_resnet.accuracy(dense, xte, yte), digits_basic_resnet.accuracy(fact, xte, yte)
    tuned = digits_basic_resnet.train(copy.deepcopy(fact), xtr, ytr, 2, lr=1e-3)
    acc_tuned = digits_basic_resnet.accuracy(tuned, xte, yte)
    x = xte[:batch]
    with torch.inference_mode():
        t_dense, t_fact = median_times([lambda: dense(x), lambda: fact(x)], min_time=2.0)
    print("| model | accuracy | latency (ms, batch %d) |" % len(x))
    print("|---|---|---|")
    print(f"| dense | {acc_dense:.4f} | {1e3 * t_dense:.2f} |")
    print(f"| Tucker-2, {flop_ratio:.0%} FLOPs | {acc_fact:.4f} | {1e3 * t_fact:.2f} |")
    print(f"| + 2 fine-tune epochs | {acc_tuned:.4f} | same |")
    print(f"speed-up dense / factorized: {t_dense / t_fact:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flop-ratio", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-svd", action="store_true")
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; tensorslim ISA best {_C.best_isa()}, active {_C.kernel_isa()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"Our SVD runs single-threaded in Eigen; torch uses its LAPACK with {torch.get_num_threads()} thread(s).\n")
    if not args.skip_svd:
        bench_svd([(128, 128, None), (128, 512, None), (512, 512, 32)] if args.quick else SVD_CASES)
    if not args.skip_cnn:
        print()
        bench_cnn(args.flop_ratio, 1 if args.quick else args.epochs, args.batch, 8 if args.quick else 32)


if __name__ == "__main__":
    main()
