"""Prune -> distill -> quantize an MLP trained on scikit-learn's digits, with a table of size,
latency and accuracy after each step.

    python examples/compress_pipeline.py [--ratio 0.75] [--steps 400]

1. Train the dense model (the teacher).
2. ts.prune with ChannelPrune removes `ratio` of the hidden neurons (physically smaller).
3. Recover accuracy by distilling from the dense teacher (ts.distill.kd_loss with labels),
   beside the same fine-tune on labels alone for comparison.
4. ts.quantize the distilled model: INT8 weights and per-token INT8 activations.
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.recipe import model_bytes


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def train(model, x, y, steps, lr, teacher=None, temperature=4.0, alpha=0.7, seed=0):
    """Adam on mini-batches; with a teacher the loss is ts.distill.kd_loss mixed with labels."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        logits = model(x[idx])
        if teacher is None:
            loss = F.cross_entropy(logits, y[idx])
        else:
            with torch.no_grad():
                t = teacher(x[idx])
            loss = ts.distill.kd_loss(logits, t, temperature=temperature, labels=y[idx], alpha=alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def latency_ms(model, batch: int = 64, rounds: int = 50) -> float:
    x = torch.randn(batch, 64)
    for _ in range(5):
        model(x)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.75, help="share of hidden neurons pruned")
    ap.add_argument("--steps", type=int, default=400, help="training / recovery steps")
    args = ap.parse_args()
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()

    teacher = train(mlp(), xtr, ytr, args.steps * 2, 1e-3)
    rows = [("dense (teacher)", teacher)]

    pruned = copy.deepcopy(teacher)
    ts.prune(pruned, ts.ChannelPrune(ratio=args.ratio, importance="l2", round_to=8),
             calib_data=[xtr[:64]], progress=False)
    rows.append((f"pruned {args.ratio:.0%} neurons", copy.deepcopy(pruned)))
    labels_only = train(copy.deepcopy(pruned), xtr, ytr, args.steps, 1e-3)
    rows.append(("  + fine-tune on labels", labels_only))
    distilled = train(copy.deepcopy(pruned), xtr, ytr, args.steps, 1e-3, teacher=teacher)
    rows.append(("  + distill from teacher", distilled))
    quantized = copy.deepcopy(distilled)
    ts.quantize(quantized, ts.Int8Dynamic(), progress=False)
    rows.append(("  + quantize int8 dynamic", quantized))

    base_ms = latency_ms(teacher)
    print(f"threads {torch.get_num_threads()}, ISA {ts._C.kernel_isa()}, batch 64")
    print(f"{'step':<28} {'KiB':>8} {'size':>6} {'ms':>7} {'speed-up':>8} {'accuracy':>8}")
    for name, model in rows:
        ms = base_ms if model is teacher else latency_ms(model)  # the dense row is the baseline: 1x
        print(f"{name:<28} {model_bytes(model) / 1024:8.1f} {model_bytes(model) / model_bytes(teacher):6.3f} "
              f"{ms:7.3f} {base_ms / ms:7.2f}x {accuracy(model, xte, yte):8.4f}")


if __name__ == "__main__":
    main()
