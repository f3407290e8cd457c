"""Compressed layers inside a model: a stack of K x K linears with GELU between (the pattern of a
transformer's MLP), dense fp32 (or bf16) against each recipe through ts.quantize, in one run.

A single layer timed alone (bench_linear.py, bench_lowbit.py) hides what a model pays between
layers: torch's own threads run the GELU, and kernels on another threading runtime (oneDNN's)
contend with them. This benchmark times the whole stack, so the choice between our kernels and
oneDNN's shows as it does in a model.

    python benchmarks/bench_layer_stack.py [--k 4096] [--layers 4] [--batches 16,32,64,256]
        [--recipes int8,int4,fp8,nvfp4,mxfp4,int8dyn,w8a8,w4a8] [--isa avx2]
        [--backend auto|native|onednn] [--dtype bfloat16]
"""
import argparse
import copy

from isa_option import add_argument as add_isa_argument, cap_from_argv, check as check_isa

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tensorslim as ts  # noqa: E402
from timing import machine_line, median_times, recipe_names  # noqa: E402

RECIPES = {
    "int8": lambda b: ts.Int8WeightOnly(backend=b),
    "int4": lambda b: ts.Int4WeightOnly(group_size=128, backend=b),
    "fp8": lambda b: ts.FP8WeightOnly(),
    "nvfp4": lambda b: ts.NVFP4(),
    "mxfp4": lambda b: ts.MXFP4(),
    "int8dyn": lambda b: ts.Int8Dynamic(),
    "w8a8": lambda b: ts.W8A8(),
    "w4a8": lambda b: ts.W4A8(),
}
CALIBRATED = {"w8a8"}  # static activation ranges: a few random batches calibrate them


def stack(K: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(K, K), nn.GELU())])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4096, help="layer width (K = N)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", default="16,32,64,256")
    p.add_argument("--recipes", default="int8,int4,fp8,nvfp4,mxfp4")
    p.add_argument("--backend", default="auto", help="int8 / int4 weight-only backend (auto, native, onednn)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="activations and the baseline's weights (bf16: torch's bf16 GEMM against ours)")
    add_isa_argument(p)
    args = p.parse_args()
    isa_line = check_isa(args)
    torch.manual_seed(0)
    print(machine_line(isa_line))
    dtype = getattr(torch, args.dtype)
    base = "fp32" if dtype == torch.float32 else "bf16"
    print(f"{args.layers} x (Linear {args.k} x {args.k} + GELU), {args.dtype} activations, "
          "median of interleaved rounds\n")
    names = recipe_names(p, args.recipes, RECIPES)
    dense = stack(args.k, args.layers).eval()
    models = {}
    for name in names:
        m = copy.deepcopy(dense)
        calib = [torch.randn(16, args.k) for _ in range(4)] if name in CALIBRATED else None
        ts.quantize(m, RECIPES[name](args.backend), calib, progress=False)
        models[name] = m.to(dtype)
    dense = dense.to(dtype)
    header = f"{'rows':>5} {base + ' ms':>9} | " + " | ".join(f"{n + ' ms':>9} {'x ' + base:>6}" for n in models)
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for M in (int(v) for v in args.batches.split(",")):
            x = torch.randn(M, args.k, dtype=dtype)
            fns = [lambda m=m: m(x) for m in [dense, *models.values()]]
            t = median_times(fns, min_time=2.0, min_rounds=5)
            print(f"{M:>5} {t[0] * 1e3:9.2f} | " + " | ".join(f"{tq * 1e3:9.2f} {t[0] / tq:5.2f}x" for tq in t[1:]))


if __name__ == "__main__":
    main()
