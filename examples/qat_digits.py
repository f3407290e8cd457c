"""Quantization-aware training recovers what post-training quantization loses.

A small MLP (64-64-64-10) is trained in float on scikit-learn's digits, quantized after
training (PTQ) to binary / INT2 / ternary weights -- every layer, the output head too,
so the loss is visible on this easy task -- then fine-tuned a few epochs with fake
quantization (ts.prepare_qat) and packed (ts.convert). The QAT accuracy is measured on
the converted model, i.e. with the real binary / INT2 / ternary kernels.

    python examples/qat_digits.py        # < 1 minute on 2 cores
"""
import copy
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import tensorslim as ts


class MLP(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def digits(seed: int = 0):
    """Train / test tensors, features standardized with the training statistics."""
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-3
    return ((xtr - mean) / std, torch.tensor(ytr), (xte - mean) / std, torch.tensor(yte))


def train(model: nn.Module, x, y, epochs: int, lr: float, seed: int = 0, batch: int = 64) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + batch - 1) // batch))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def float_model(data, seed: int = 0, epochs: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    return train(MLP(), data[0], data[1], epochs=epochs, lr=2e-3, seed=seed)


def ptq(model: nn.Module, config) -> nn.Module:
    m = copy.deepcopy(model)
    ts.quantize(m, config, progress=False)
    return m


def qat(model: nn.Module, config, data, epochs: int = 10, lr: float = 1e-3, seed: int = 0,
        learnable_scales: bool = False) -> nn.Module:
    """Fake-quantized fine-tuning from the float model, then conversion to packed kernels."""
    m = copy.deepcopy(model)
    ts.prepare_qat(m, config, learnable_scales=learnable_scales, progress=False)
    train(m, data[0], data[1], epochs=epochs, lr=lr, seed=seed)
    ts.convert(m)
    return m


# skip_output_head=False: the head is quantized too (by default it stays fp32)
CONFIGS = {
    "binary": ts.Binary(skip_output_head=False),
    "int2": ts.IntWeightOnly(bits=2, group_size=None, skip_output_head=False),
    "ternary": ts.Ternary(skip_output_head=False),
}


def main():
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    start = time.time()
    data = digits()
    model = float_model(data)
    fp32 = accuracy(model, data[2], data[3])
    print(f"fp32 MLP 64-64-64-10 on digits: test accuracy {fp32:.4f}  (all three layers quantized)\n")
    print(f"{'format':<10} {'fp32':>7} {'PTQ':>7} {'QAT':>7} {'QAT+LSQ':>8}  recovered")
    for name, cfg in CONFIGS.items():
        acc_ptq = accuracy(ptq(model, cfg), data[2], data[3])
        converted = qat(model, cfg, data)
        assert not any(isinstance(m, ts.QATLinear) for m in converted.modules())
        acc_qat = accuracy(converted, data[2], data[3])
        acc_lsq = accuracy(qat(model, cfg, data, learnable_scales=True), data[2], data[3])
        lost = fp32 - acc_ptq
        rec = (acc_qat - acc_ptq) / lost if lost > 0 else float("nan")
        print(f"{name:<10} {fp32:7.4f} {acc_ptq:7.4f} {acc_qat:7.4f} {acc_lsq:8.4f}  {rec:6.0%}")
    print(f"\n(QAT columns: the converted model, real packed kernels; {time.time() - start:.1f} s)\n")
    print(f"the last converted model ({name}):")
    print(ts.summary(converted))


if __name__ == "__main__":
    main()
