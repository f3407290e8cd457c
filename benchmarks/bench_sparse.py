"""Sparse linears: torch fp32 F.linear vs torch's CSR (to_sparse_csr) vs tensorslim CSR and
N:M kernels, one run.

For each weight shape N x K (out x in) and batch M it prints the median time of dense fp32,
then per format: torch's CSR time (unstructured rows only; the faster of torch.sparse.mm and
x @ Wcsr.t(), timed in interleaved rounds with ours so that load from other processes
falls on both), ours, the speed-up over dense and over torch's CSR, and %bw: the bytes the
product must move (packed weight + x + y) / the copy bandwidth measured in this run, divided
by the time. Ours is the call CSRSparseLinear / NMSparseLinear make (ops.sparse.csr_linear_direct
and nm_linear_direct: the kernel without the checked op's Python argument checks).

    python benchmarks/bench_sparse.py [--isa avx2] [--gathers on|off] [--pieces on|off] [--quick]
        [--shapes 4096x4096,4096x11008,11008x4096] [--patterns 2:4,4:8,1:4,2:8,1:8]
"""
import argparse

import torch
import torch.nn.functional as F

import tensorslim as ts
from tensorslim.ops import sparse as S
from timing import copy_bandwidth, cpu_name, median_times, timeit


def nm_keep(w, n, m):
    a = w.abs().reshape(w.shape[0], -1, m)
    top = a.topk(n, dim=-1).indices
    return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, top, True).reshape(w.shape)


def torch_csr_fns(w_sparse, x):
    """torch's two CSR spellings that run here, by name."""
    wc = w_sparse.to_sparse_csr()
    cands = {"sparse.mm": lambda: torch.sparse.mm(wc, x.t()).t(), "x@Wcsr.t()": lambda: x @ wc.t()}
    ok = {}
    for name, fn in cands.items():
        try:
            fn()
        except RuntimeError:
            continue
        ok[name] = fn
    return ok


def ours_vs_torch_csr(ours, w_sparse, x, min_time):
    """Ours and the faster of torch's CSR spellings, timed in interleaved rounds so that load
    from other processes falls on both alike: (our time, (torch time, name) or None)."""
    cands = torch_csr_fns(w_sparse, x) if w_sparse is not None else {}
    times = median_times([ours, *cands.values()], min_time=min_time * (1 + len(cands)), warmup=2)
    best = min(zip(times[1:], cands.keys())) if cands else None
    return times[0], best


def nbytes(*ts_):
    return sum(t.numel() * t.element_size() for t in ts_ if t is not None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008",
                   help="NxK list (out x in); add 11008x4096 for the other order")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--sparsities", default="0.5,0.75,0.9,0.95", help="unstructured sparsities (\"\" for none)")
    p.add_argument("--isa", choices=("avx2", "avx512", "scalar"), help="force a tensorslim code path")
    p.add_argument("--patterns", default="2:4", help="N:M patterns, e.g. 2:4,4:8,1:4,2:8,1:8 (\"\" for none)")
    p.add_argument("--gathers", choices=("on", "off"),
                   help="scattered reads (CSR batches 1-2): gathers or scalar loads (default: gathers on Intel)")
    p.add_argument("--pieces", choices=("on", "off"), default="on",
                   help="N:M int8 / int4 at batches 1-12 on integer units (AVX-512 VNNI + VBMI) or the float kernels")
    p.add_argument("--quick", action="store_true", help="4096x4096, 90%% and 2:4, batches 1 and 8")
    args = p.parse_args()
    if args.quick:
        args.shapes, args.batches, args.sparsities = "4096x4096", "1,8", "0.9"
    if args.isa:
        ts._C.set_isa(args.isa)
    if args.gathers:
        ts._C.set_sparse_gathers(args.gathers == "on")
    ts._C.set_activation_pieces_enabled(args.pieces == "on")
    min_time = 0.2
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
          f"tensorslim ISA {ts._C.kernel_isa()} (best {ts._C.best_isa()}), "
          f"{ts._C.num_threads()} tensorslim threads ({ts._C.threading_backend()}), "
          f"scattered reads by {'gathers' if ts._C.sparse_gathers() else 'scalar loads'}, "
          f"activation pieces {args.pieces}")
    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s")
    if args.isa:
        print(f"--isa {args.isa} caps tensorslim only; torch's dense and CSR kernels keep their own ISA")
    print()
    header = (f"{'N x K':>12} {'M':>3} {'format':>14} | {'dense ms':>8} | {'torch csr ms':>12} | "
              f"{'ours ms':>8} {'x dense':>8} {'x csr':>6} {'%bw':>5}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K)
        packs = []  # (label, linear(x), packed bytes, torch-csr weight or None)
        for sp in (float(s) for s in filter(None, args.sparsities.split(","))):  # "" for none
            keep = torch.rand(N, K) >= sp
            for dt in (torch.float32, torch.int8):
                v, c, rp, sc = S.csr_pack(w, keep, dt)
                label = f"{int(sp * 100)}% {'fp32' if dt == torch.float32 else 'int8'}"
                fn = lambda x, v=v, c=c, rp=rp, sc=sc: S.csr_linear_direct(x, v, c, rp, sc, None, "auto")  # noqa: E731
                packs.append((label, fn, nbytes(v, c, rp, sc), (w * keep) if dt == torch.float32 else None))
        for pattern in filter(None, args.patterns.split(",")):  # "" for none
            n, m = (int(a) for a in pattern.split(":"))
            keep_nm = nm_keep(w, n, m)
            for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.int8, "int8"),
                             (S.INT4_VALUES, "int4")):
                v, i, sc = S.nm_pack(w, keep_nm, n, m, dt)
                fn = lambda x, v=v, i=i, sc=sc, n=n, m=m: S.nm_linear_direct(  # noqa: E731
                    x, v, i, sc, None, n, m, "auto")
                packs.append((f"{n}:{m} {name}", fn, nbytes(v, i, sc), None))
        for M in (int(b) for b in args.batches.split(",")):
            x = torch.randn(M, K)
            act = 4 * M * (K + N)
            t_dense = timeit(lambda: F.linear(x, w), min_time=min_time, warmup=2)
            for label, fn, wbytes, w_sparse in packs:
                t, csr = ours_vs_torch_csr(lambda: fn(x), w_sparse, x, min_time)
                csr_ms = f"{csr[0] * 1e3:12.3f}" if csr else f"{'-':>12}"
                vs_csr = f"{csr[0] / t:5.2f}x" if csr else f"{'-':>6}"
                print(f"{N:>5} x {K:<5} {M:>3} {label:>14} | {t_dense * 1e3:8.3f} | {csr_ms} | "
                      f"{t * 1e3:8.3f} {t_dense / t:7.2f}x {vs_csr} {100 * (wbytes + act) / bw / t:4.0f}%",
                      flush=True)
    print("\ndense fp32 moves 4*N*K bytes of weight; torch csr: the faster of torch.sparse.mm(W, x.t()).t() "
          "and x @ W.t() on W.to_sparse_csr()")


if __name__ == "__main__":
    main()
