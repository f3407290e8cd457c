"""A small ResNet-style CNN for scikit-learn's 8x8 digits, for the structured-pruning tests,
benchmark and docs: residual blocks with BatchNorm and a depthwise-separable branch, a
downsampling stage, a two-branch concatenation, global average pooling and a linear head.
Trains in a few seconds on a CPU."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """conv3x3-BN-ReLU, depthwise 3x3-BN-ReLU, pointwise 1x1-BN, + identity, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv(x)))
        y = F.relu(self.bn2(self.dw(y)))
        return F.relu(x + self.bn3(self.pw(y)))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = Block(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(2 * width)
        self.block2 = Block(2 * width)
        self.block3 = Block(2 * width)
        self.branch_a = nn.Conv2d(2 * width, width, 1)
        self.branch_b = nn.Conv2d(2 * width, width, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block1(x)
        x = F.relu(self.bn_down(self.down(x)))
        x = self.block3(self.block2(x))
        x = F.relu(self.bn_cat(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)))
        return self.head(x.mean((2, 3)))


def digits(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 8x8 images in [0, 1], a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150, lr: float = 3e-3,
          batch: int = 64, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds x 2 of every Conv / Linear in one forward pass of x."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            total[0] += 2 * out.numel() * k
        elif isinstance(m, nn.Linear):
            total[0] += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]
