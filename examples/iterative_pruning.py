"""Gradual pruning inside an ordinary training loop (Zhu & Gupta 2017).

Unstructured: an MLP learns scikit-learn's 8x8 digits; ts.pruning.Schedule raises its
sparsity from 0 to 90% along the cubic curve while it trains, then ts.pruning.finalize
bakes the zeros in.
Structured (--structured): a ResNet-style CNN loses half of its channels gradually (they
are masked while training), then sched.finalize() removes them: smaller layers, fewer FLOPs.
Run: python examples/iterative_pruning.py [--structured]  (seconds on a CPU)
"""
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import tensorslim as ts


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = 600
    sched = ts.pruning.Schedule(model, ts.Magnitude(sparsity=0.9, scope="global", skip_output_head=False),
                                start_step=100, end_step=450, frequency=25)

    def accuracy():
        with torch.no_grad():
            return float((model(x[test]).argmax(1) == y[test]).float().mean())

    for step in range(1, steps + 1):
        idx = train[torch.randint(0, len(train), (64,))]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruned = sched.step() is not None
        if step == sched.start_step or (pruned and step % 100 == 0):  # start_step: still dense
            print(f"step {step}: target sparsity {sched.current:.1%}, test accuracy {accuracy():.3f}")
    print(ts.summary(model))  # each pruned layer's sparsity
    ts.pruning.finalize(model)  # bake the zeros in, drop masks and hooks
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    print(f"final: {zeros:.1%} of the weights are zero, test accuracy {accuracy():.3f}")


def structured():
    from tensorslim.eval import digits_cnn as D

    torch.manual_seed(0)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = D.digits()
    model = D.DigitsResNet()
    flops_before = D.flops(model, xte[:1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = ts.pruning.Schedule(model, ts.ChannelPrune(ratio=0.5), start_step=50, end_step=200,
                                frequency=25, example_inputs=xtr[:2])
    for step in range(1, 301):
        idx = torch.randint(0, len(xtr), (64,))
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched.step() is not None:
            print(f"step {step}: {sched.current:.0%} of the channels masked")
    sched.finalize()  # masked channels leave: the layers shrink
    print(f"FLOPs per image {flops_before} -> {D.flops(model, xte[:1])}, "
          f"test accuracy {D.accuracy(model, xte, yte):.3f}")
    print(ts.summary(model))


if __name__ == "__main__":
    structured() if "--structured" in sys.argv else main()
