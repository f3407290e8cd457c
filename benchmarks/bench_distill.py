"""KD loss forward + backward on the CPU: the plain PyTorch expression users write today
(log_softmax of both logits / T, kl_div batchmean, times T^2; Hinton et al. 2015) against
ts.distill.kd_loss, fp32 logits [rows, vocab], measured in one run: time of forward +
backward (interleaved medians) and peak extra memory. --dtype bf16 gives both bf16 logits
(the plain expression then computes in bf16, ours in fp32).

Peak extra memory = the process's peak resident set size during one forward + backward,
minus its size with the inputs allocated and touched (each measured in a fresh child
process, from the kernel's exact high-water mark VmHWM, reset just before); it includes the gradient [rows, vocab],
which both must produce (in the logits' dtype); the last column is what remains beyond the
gradient, as a fraction of one fp32 copy of the logits.

    .venv/bin/python benchmarks/bench_distill.py [--sizes 512x32000 1024x65536 ...] [--temperature 2] [--dtype fp32|bf16] [--memory-only]
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import tensorslim as ts
from timing import cpu_name, median_times

DEFAULT_SIZES = ["512x32000", "2048x32000", "1024x65536", "512x131072", "1024x131072"]


def plain(s, t, T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * T * T


def ours(s, t, T):
    return ts.distill.kd_loss(s, t, temperature=T)


def step(fn, s, t, T):
    s.grad = None
    fn(s, t, T).backward()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(rows, vocab, dtype="fp32"):
    g = torch.Generator().manual_seed(0)
    # filled in place: no temporary copy raises the high-water mark before the measurement
    s = torch.empty(rows, vocab, dtype=DTYPES[dtype]).normal_(0, 3, generator=g).requires_grad_(True)
    t = torch.empty(rows, vocab, dtype=DTYPES[dtype]).normal_(0, 3, generator=g)
    return s, t


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(which, rows, vocab, T, dtype):
    """Runs in a fresh process: peak RSS above the inputs during one forward + backward."""
    step(ours, *inputs(8, 64), T)  # load kernels / lazily initialized state first
    step(plain, *inputs(8, 64), T)
    s, t = inputs(rows, vocab, dtype)
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to now
        f.write("5")
    base = rss_bytes()
    step(ours if which == "ours" else plain, s, t, T)
    return max(hwm_bytes() - base, 0)


def peak_extra(which, rows, vocab, T, dtype):
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([which, rows, vocab, T, dtype])],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="ROWSxVOCAB")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="logits dtype")
    p.add_argument("--memory-only", action="store_true", help="skip the timing (for a loaded machine)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(memory_child(*json.loads(args.child)))
        return
    T = args.temperature
    load = os.getloadavg()[0]
    print(f"{cpu_name()}, ISA {ts._C.active_isa()}, torch {torch.__version__}, threads: torch "
          f"{torch.get_num_threads()} / ours {ts._C.num_threads()}, load average {load:.2f}, T={T}, {args.dtype} logits")
    if load >= 0.5:
        print("note: the machine is loaded (load average >= 0.5): the time ratios need an idle run; "
              "the memory figures do not depend on load")
    print(f"{'rows':>6} {'vocab':>7} {'plain ms':>9} {'ours ms':>8} {'speed-up':>9} "
          f"{'plain extra MiB':>16} {'ours extra MiB':>15} {'mem ratio':>10} {'ours (extra - grad) / fp32 logits':>34}")
    for size in args.sizes:
        rows, vocab = (int(v) for v in size.lower().split("x"))
        tp = to = float("nan")
        if not args.memory_only:
            s, t = inputs(rows, vocab, args.dtype)
            tp, to = median_times([lambda: step(plain, s, t, T), lambda: step(ours, s, t, T)],
                                  min_time=args.min_time, min_rounds=5)
            del s, t
        mp, mo = peak_extra("plain", rows, vocab, T, args.dtype), peak_extra("ours", rows, vocab, T, args.dtype)
        logits = rows * vocab * DTYPES[args.dtype].itemsize  # one copy of the logits, gradient's size
        print(f"{rows:>6} {vocab:>7} {tp * 1e3:>9.1f} {to * 1e3:>8.1f} {tp / to:>8.2f}x "
              f"{mp / 2**20:>16.0f} {mo / 2**20:>15.0f} {mo / mp:>10.3f} {(mo - logits) / (rows * vocab * 4):>34.4f}", flush=True)


if __name__ == "__main__":
    main()
