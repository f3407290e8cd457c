"""Pruning evidence, each part measured in one run:

  cnn     ResNet-style CNN on scikit-learn digits: FLOPs, parameters and latency of the
          dense and the ChannelPrune(0.5) model (interleaved median times, ratio), and
          accuracy dense / pruned / pruned + short fine-tune.
  minilm  all-MiniLM-L6-v2 embedding cosine vs fp32 on 96 pydoc sentences:
          Magnitude vs RandomPrune at 50 / 80 / 90% unstructured, and ChannelPrune
          (25% FFN neurons + 2 of 12 heads per layer) per importance criterion, with and
          without bias compensation.
  lm      the tiny LLaMA-style LM: perplexity after ChannelPrune of heads and FFN neurons.
  select  global threshold over many layers: our radix selection (no copy of the scores)
          vs torch (concatenate all |w|, kthvalue), time and the extra bytes each holds.

    python benchmarks/bench_prune.py [--parts cnn,minilm,lm,select] [--threads N]

Timing figures are only meaningful on an idle machine: the script prints the load average.
"""
import argparse
import copy
import os
import time

import torch

import tensorslim as ts
from timing import cpu_name, median_times


def part_cnn():
    from tensorslim.eval import digits_cnn as D

    xtr, ytr, xte, yte = D.digits()
    torch.manual_seed(0)
    dense = D.train(D.DigitsResNet(), xtr, ytr, steps=150)
    pruned = copy.deepcopy(dense)
    t0 = time.perf_counter()
    ts.prune(pruned, ts.ChannelPrune(ratio=0.5), calib_data=[xtr[:16]], progress=False)
    prune_s = time.perf_counter() - t0
    acc_d, acc_p0 = D.accuracy(dense, xte, yte), D.accuracy(pruned, xte, yte)
    D.train(pruned, xtr, ytr, steps=100, lr=2e-3, seed=1)
    acc_p = D.accuracy(pruned, xte, yte)
    f_d, f_p = D.flops(dense, xte[:1]), D.flops(pruned, xte[:1])
    n_d = sum(p.numel() for p in dense.parameters())
    n_p = sum(p.numel() for p in pruned.parameters())
    print(f"\n## ResNet-style digits CNN, ChannelPrune(ratio=0.5, importance='l1'), pruned in {prune_s:.2f} s")
    print(f"FLOPs per image {f_d} -> {f_p} ({1 - f_p / f_d:.1%} removed); parameters {n_d} -> {n_p}")
    print(f"accuracy (360 test images): dense {acc_d:.3f}, pruned {acc_p0:.3f}, pruned + 100-step fine-tune {acc_p:.3f}")
    print("| batch | dense ms | pruned ms | speed-up |\n|---|---|---|---|")
    for batch in (1, 64, 256):
        x = xte[:batch] if batch <= len(xte) else xte.repeat(batch // len(xte) + 1, 1, 1, 1)[:batch]
        with torch.no_grad():
            td, tp = median_times([lambda: dense(x), lambda: pruned(x)], min_time=1.0)
        print(f"| {batch} | {td * 1e3:.3f} | {tp * 1e3:.3f} | {td / tp:.2f}x |")


def part_minilm():
    from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences

    model, tok = load_minilm()
    sentences = pydoc_sentences(96)
    ref = embed(model, tok, sentences)
    print("\n## MiniLM unstructured (embedding cosine vs fp32, 96 sentences)")
    print("| sparsity | Magnitude layer | Magnitude global | RandomPrune |\n|---|---|---|---|")
    for s in (0.5, 0.8, 0.9):
        row = []
        for cfg in (ts.Magnitude(sparsity=s), ts.Magnitude(sparsity=s, scope="global"), ts.RandomPrune(sparsity=s)):
            m = copy.deepcopy(model)
            ts.prune(m, cfg, progress=False)
            row.append(embedding_cosine(embed(m, tok, sentences), ref))
        print(f"| {s:.0%} | " + " | ".join(f"{c:.4f}" for c in row) + " |")
    # calibration (taylor, wanda): 64 other sentences, not the 96 the cosine is measured on
    others = pydoc_sentences(96 + 64)[96:]
    calib = [dict(tok(others[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, 64, 16)]
    print("\n## MiniLM ChannelPrune: 25% FFN neurons + 2 of 12 heads per layer (64 calibration sentences)")
    print("| importance | cosine vs fp32 | parameters |\n|---|---|---|")
    for imp, comp in [(i, False) for i in ("l1", "l2", "random", "taylor", "wanda")] + [("l2", True), ("wanda", True)]:
        m = copy.deepcopy(model)
        ts.prune(m, ts.ChannelPrune(ratio=0.25, head_ratio=2 / 12, importance=imp, compensate=comp), calib_data=calib,
                 progress=False)
        n = sum(p.numel() for p in m.parameters())
        what = f"{imp}{' + compensate' if comp else ''}"
        print(f"| {what} | {embedding_cosine(embed(m, tok, sentences), ref):.4f} | {n} |")
    print(f"(dense parameters: {sum(p.numel() for p in model.parameters())})")


def part_lm():
    from tensorslim.eval import perplexity, tiny_lm

    lm = tiny_lm.load_tiny_lm()
    train, held = tiny_lm.train_eval_split()
    ids = held[:4096]
    calib = [train[i * 128:(i + 1) * 128][None] for i in range(16)]  # taylor, wanda
    print("\n## tiny LLaMA-style LM (4096 held-out pydoc bytes, seq 128; 16 training windows to calibrate)")
    print(f"dense perplexity {perplexity(lm, ids, seq_len=128):.3f}")
    print("| pruned | importance | perplexity |\n|---|---|---|")
    for ratio, heads in ((0.25, 0.25), (0.5, 0.5)):
        for imp, comp in [(i, False) for i in ("l1", "random", "taylor", "wanda")] + [("wanda", True)]:
            m = copy.deepcopy(lm)
            ts.prune(m, ts.ChannelPrune(ratio=ratio, head_ratio=heads, importance=imp, compensate=comp),
                     calib_data=calib, progress=False)
            what = f"{imp}{' + compensate' if comp else ''}"
            print(f"| {ratio:.0%} FFN neurons, {heads:.0%} heads | {what} | {perplexity(m, ids, seq_len=128):.3f} |")


def part_select():
    from tensorslim.pruning import select

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(2048, 4096, generator=gen) for _ in range(4)]
    n = sum(w.numel() for w in layers)
    k = int(0.8 * n)
    small = [w[:8] for w in layers]  # warm-up: the ops' first call pays one-time dispatcher set-up
    select.global_counts(small, 1, 16, [0] * 4, [8] * 4)
    torch.kthvalue(torch.cat([w.reshape(-1).abs() for w in small]), 16)
    t_ours = time.perf_counter()
    _, t, _ = select.global_counts(layers, 1, k, [0] * 4, [w.numel() for w in layers])
    t_ours = time.perf_counter() - t_ours
    t_torch = time.perf_counter()
    ref = float(torch.kthvalue(torch.cat([w.reshape(-1).abs() for w in layers]), k).values)
    t_torch = time.perf_counter() - t_torch
    assert ref == t
    print(f"\n## global threshold over {n / 1e6:.1f} M weights (4 layers), k = 80%")
    print(f"radix selection (ours): {t_ours:.3f} s, extra memory {4 * 2048 * 8} B of histograms (+ one fp32 chunk"
          " only for non-fp32 weights)")
    print(f"torch cat + kthvalue: {t_torch:.3f} s, extra memory {2 * 4 * n / 2**20:.0f} MiB (|w| copies); "
          f"same threshold: {ref == t}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="cnn,minilm,lm,select")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    parts = {"cnn": part_cnn, "minilm": part_minilm, "lm": part_lm, "select": part_select}
    unknown = [part for part in args.parts.split(",") if part not in parts]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)} (choose from {','.join(parts)})")
    if args.threads:
        torch.set_num_threads(args.threads)
        ts._C.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"# bench_prune: {cpu_name()}, ISA {ts._C.active_isa()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {load:.2f}"
          + ("  <- NOT idle: timings unreliable" if load >= 0.5 else ""))
    for part in args.parts.split(","):
        parts[part]()


if __name__ == "__main__":
    main()
