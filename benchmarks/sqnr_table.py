"""SQNR of every weight format on Gaussian and heavy-tailed (Student-t, 3 degrees of
freedom) weights, as a markdown table.

SQNR = 20 log10(||w|| / ||w - dequantize(quantize(w))||); bits/weight counts the packed
codes plus scales (and zero points / the tensor scale) actually stored.

    python benchmarks/sqnr_table.py [--rows 1024] [--cols 1024] [--seed 0]
"""
import argparse

import torch

from tensorslim import ops
from tensorslim.formats import get_format

# (format, group size): None = one scale per row
CASES = [
    ("fp8_e4m3", None), ("fp8_e5m2", None), ("nvfp4", 16), ("mxfp4", 32),
    ("int8", None), ("int7", 128), ("int6", 128), ("int5", 128), ("int4", 128), ("int4", 32),
    ("uint4", 128), ("int3", 128), ("int3", 32), ("uint3", 32), ("int2", 32), ("uint2", 32),
    ("ternary", None), ("binary", None),
]


def sqnr_db(w: torch.Tensor, fmt: str, group: int) -> float:
    q, s, z, t = ops.quantize_lowbit(w, fmt, group)
    deq = ops.dequantize_lowbit(q, s, z, t, fmt, group, w.shape[1])
    w64, d64 = w.double(), deq.double()
    return float(20 * torch.log10(w64.norm() / (w64 - d64).norm()))


def bits_per_weight(w: torch.Tensor, fmt: str, group: int) -> float:
    q, s, z, t = ops.quantize_lowbit(w, fmt, group)
    nbytes = sum(v.numel() * v.element_size() for v in (q, s, z, t) if v is not None)
    return 8 * nbytes / w.numel()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    gauss = torch.randn(args.rows, args.cols, generator=gen)
    torch.manual_seed(args.seed)
    heavy = torch.distributions.StudentT(3.0).sample((args.rows, args.cols))
    print(f"{args.rows} x {args.cols} weights, seed {args.seed}\n")
    print("| format | group | bits/weight | SQNR Gaussian (dB) | SQNR Student-t(3) (dB) |")
    print("|---|---|---|---|---|")
    for fmt, group in CASES:
        g = group or args.cols
        label = "per-row" if group is None else f"g{group}"
        if get_format(fmt).block_size:
            label = f"block {group}"
        print(f"| {fmt} | {label} | {bits_per_weight(gauss, fmt, g):.2f} | "
              f"{sqnr_db(gauss, fmt, g):.2f} | {sqnr_db(heavy, fmt, g):.2f} |")


if __name__ == "__main__":
    main()
