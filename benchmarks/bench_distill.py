"""Distillation losses forward + backward on the CPU, the plain PyTorch expression users write
today against ours, measured in one run: time of forward + backward (interleaved medians) and
peak extra memory.

KD: (log_softmax of both logits / T, kl_div batchmean, times T^2; Hinton et al. 2015) against
ts.distill.kd_loss, fp32 logits [rows, vocab]. --dtype bf16 gives both bf16 logits
(the plain expression then computes in bf16, ours in fp32).
Features: ts.distill.hidden_loss (hidden states [tokens, width], MSE / cosine) and
ts.distill.attention_loss (maps [batch, heads, queries, keys], KL over probabilities or
scores, MSE) in the native core against the same losses written in PyTorch (PLAIN_FEATURES).

Peak extra memory = the process's peak resident set size during one forward + backward,
minus its size with the inputs allocated and touched (each measured in a fresh child
process, from the kernel's exact high-water mark VmHWM, reset just before); it includes the gradient [rows, vocab],
which both must produce (in the logits' dtype); the last column is what remains beyond the
gradient, as a fraction of one fp32 copy of the logits.

    .venv/bin/python benchmarks/bench_distill.py [--sizes 512x32000 1024x65536 ...] [--temperature 2]
        [--dtype fp32|bf16] [--memory-only] [--losses kd features] [--hidden 4096x768]
        [--attention 8x12x512x512] [--quick]
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
QUICK_SIZES = ["512x32000", "1024x65536"]
FEATURES = {  # name: (kind of input, our loss's kwargs)
    "hidden mse": ("hidden", dict(kind="mse")),
    "hidden cosine": ("hidden", dict(kind="cosine")),
    "attention kl (probs)": ("attention", dict(kind="kl", from_logits=False)),
    "attention kl (scores)": ("attention", dict(kind="kl", from_logits=True)),
    "attention mse (probs)": ("attention", dict(kind="mse", from_logits=False)),
}


def _rows(x):
    return x.reshape(-1, x.shape[-1])


PLAIN_FEATURES = {  # the same losses as users write them in PyTorch
    "hidden mse": lambda s, t: F.mse_loss(s, t),
    "hidden cosine": lambda s, t: (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean(),
    "attention kl (probs)": lambda s, t: (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1).mean(),
    "attention kl (scores)": lambda s, t: F.kl_div(F.log_softmax(_rows(s), -1), F.log_softmax(_rows(t), -1),
                                                   reduction="batchmean", log_target=True),
    "attention mse (probs)": lambda s, t: F.mse_loss(s, t),
}


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


def feature_inputs(name, shape, dtype="fp32"):
    """Student (requires grad) and teacher for one FEATURES entry, filled in place."""
    g = torch.Generator().manual_seed(0)
    what, kw = FEATURES[name]
    s = torch.empty(shape, dtype=DTYPES[dtype]).normal_(0, 2, generator=g)
    t = torch.empty(shape, dtype=DTYPES[dtype]).normal_(0, 2, generator=g)
    if what == "attention" and not kw["from_logits"]:
        s, t = s.softmax(-1), t.softmax(-1)
    return s.requires_grad_(True), t


def feature_step(name, which, s, t):
    """One forward + backward: which = "plain" (PLAIN_FEATURES) or "ours" (native core)."""
    what, kw = FEATURES[name]
    s.grad = None
    if which == "plain":
        PLAIN_FEATURES[name](s, t).backward()
        return
    fn = ts.distill.hidden_loss if what == "hidden" else ts.distill.attention_loss
    fn(s, t, backend="native", **kw).backward()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_during(fn):
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to now
        f.write("5")
    base = rss_bytes()
    fn()
    return max(hwm_bytes() - base, 0)


def memory_child(which, rows, vocab, T, dtype):
    """Runs in a fresh process: peak RSS above the inputs during one forward + backward."""
    step(ours, *inputs(8, 64), T)  # load kernels / lazily initialized state first
    step(plain, *inputs(8, 64), T)
    s, t = inputs(rows, vocab, dtype)
    return _peak_during(lambda: step(ours if which == "ours" else plain, s, t, T))


def feature_memory_child(which, name, shape, dtype):
    """As memory_child, for one FEATURES entry (which: "plain" or "ours")."""
    small = [2] * (len(shape) - 1) + [8]
    for w in ("plain", "ours"):
        feature_step(name, w, *feature_inputs(name, small))
    s, t = feature_inputs(name, shape, dtype)
    return _peak_during(lambda: feature_step(name, which, s, t))


def peak_extra(*args, child="kd"):
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([child, *args])],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def parse_shape(text):
    return [int(v) for v in text.lower().split("x")]


def features_table(args):
    print(f"\nfeature losses, {args.dtype}: plain = the PyTorch expression (PLAIN_FEATURES), ours = the "
          "native core; extra memory includes the student's gradient")
    print(f"{'loss':>22} {'shape':>16} {'plain ms':>9} {'ours ms':>8} {'speed-up':>9} "
          f"{'plain extra MiB':>16} {'ours extra MiB':>15} {'mem ratio':>10}")
    for name, (what, _) in FEATURES.items():
        shape = parse_shape(args.hidden if what == "hidden" else args.attention)
        tp = to = float("nan")
        if not args.memory_only:
            s, t = feature_inputs(name, shape, args.dtype)
            tp, to = median_times([lambda: feature_step(name, "plain", s, t),
                                   lambda: feature_step(name, "ours", s, t)],
                                  min_time=args.min_time, min_rounds=5)
            del s, t
        mp = peak_extra("plain", name, shape, args.dtype, child="features")
        mo = peak_extra("ours", name, shape, args.dtype, child="features")
        print(f"{name:>22} {'x'.join(map(str, shape)):>16} {tp * 1e3:>9.1f} {to * 1e3:>8.1f} {tp / to:>8.2f}x "
              f"{mp / 2**20:>16.0f} {mo / 2**20:>15.0f} {mo / max(mp, 1):>10.3f}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="ROWSxVOCAB")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="logits dtype")
    p.add_argument("--memory-only", action="store_true", help="skip the timing (for a loaded machine)")
    p.add_argument("--losses", nargs="+", choices=["kd", "features"], default=["kd", "features"])
    p.add_argument("--hidden", default="4096x768", help="hidden states TOKENSxWIDTH")
    p.add_argument("--attention", default="8x12x512x512", help="attention maps BATCHxHEADSxQUERIESxKEYS")
    p.add_argument("--quick", action="store_true", help="two KD sizes, smaller feature shapes, shorter timing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        print(memory_child(*rest) if kind == "kd" else feature_memory_child(*rest))
        return
    if args.quick:
        args.sizes = QUICK_SIZES if args.sizes == DEFAULT_SIZES else args.sizes
        args.min_time = min(args.min_time, 0.3)
        args.hidden, args.attention = "2048x768", "4x12x256x256"
    T = args.temperature
    load = os.getloadavg()[0]
    print(f"{cpu_name()}, ISA {ts._C.kernel_isa()}, torch {torch.__version__}, threads: torch "
          f"{torch.get_num_threads()} / ours {ts._C.num_threads()}, load average {load:.2f}, T={T}, {args.dtype} logits")
    if load >= 0.5:
        print("note: the machine is loaded (load average >= 0.5): the time ratios need an idle run; "
              "the memory figures do not depend on load")
    if "features" in args.losses:
        features_table(args)
    if "kd" not in args.losses:
        return
    print(f"\nKD loss, {args.dtype} logits")
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
