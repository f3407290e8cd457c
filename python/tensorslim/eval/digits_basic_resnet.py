"""A small ResNet-style CNN (basic blocks) on scikit-learn's 8x8 digits (upsampled to 16x16), trained in
seconds on a CPU: the convolutional test bed for factorization (tests, benchmarks, examples)."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1 strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """stem 3x3 (1 -> w) at size x size (the 8x8 digits upsampled), blocks (w), (w -> 2w, /2),
    (2w -> 4w, /2), average pool, linear head."""

    def __init__(self, width: int = 32, size: int = 16):
        super().__init__()
        self.size = size
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x):
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def digits_images(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x [N, 1, 8, 8], train y, test x, test y), standardized with training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    mean, std = float(xtr.mean()), float(xtr.std())
    shape = (-1, 1, 8, 8)
    return ((xtr - mean).div(std).reshape(shape), torch.tensor(ytr),
            (xte - mean).div(std).reshape(shape), torch.tensor(yte))


def train(model: nn.Module, x, y, epochs: int, lr: float = 3e-3, seed: int = 0, batch: int = 64,
          loss_fn=None) -> nn.Module:
    """Adam with a cosine schedule; leaves the model in eval mode. loss_fn(logits, idx): the
    loss of the batch x[idx] (default: cross-entropy with y[idx]; a distillation loss)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) if loss_fn is None else loss_fn(logits, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
