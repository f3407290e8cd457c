"""Sparse convolutions: torch's dense fp32 F.conv2d (oneDNN) vs tensorslim's CSRSparseConv2d /
NMSparseConv2d (ts.sparsify by magnitude), ResNet-shaped layers, one run.

For each layer and batch it prints the dense time and, per format, ours and the speed-up, timed
in interleaved rounds (timing.median_times) so that load falls on both alike.

    python benchmarks/bench_sparse_conv.py [--isa avx2] [--gathers on|off] [--batches 1,8]
        [--formats 50%,75%,90%,2:4] [--model]

--model times a whole ResNet-18 (written here; BatchNorm in eval mode, 224 x 224) instead:
dense against each format applied to every conv and the classifier.
"""
import argparse

import torch
from torch import nn

import tensorslim as ts
from timing import machine_line, median_times

# (in, out, kernel, stride, spatial): ResNet-18 / -50 stage shapes at 224 x 224
LAYERS = [(64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7),
          (256, 64, 1, 1, 56), (64, 128, 3, 2, 56)]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18() -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers).eval()


def bench_model(formats, batches):
    dense = resnet18()
    models = []
    for fmt in formats:
        m = resnet18()
        m.load_state_dict(dense.state_dict())
        ts.sparsify(m, config_for(fmt), progress=False)
        models.append(m)
    cells = " | ".join(f"{f:>5} ms  x dense" for f in formats)
    print(f"{'ResNet-18 224x224':>18} {'B':>2} | {'dense ms':>8} | {cells}")
    for B in batches:
        x = torch.randn(B, 3, 224, 224)
        with torch.inference_mode():
            times = median_times([lambda: dense(x)] + [lambda m=m: m(x) for m in models], min_time=2.0)
        cells = " | ".join(f"{t * 1e3:8.2f} {times[0] / t:7.2f}x" for t in times[1:])
        print(f"{'':>18} {B:>2} | {times[0] * 1e3:8.2f} | {cells}", flush=True)


def config_for(fmt: str):
    if ":" in fmt:
        n, m = (int(v) for v in fmt.split(":"))
        return ts.NM(n, m)
    return ts.Unstructured(float(fmt.rstrip("%")) / 100)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--formats", default="50%,75%,90%,2:4")
    p.add_argument("--isa", choices=("avx2", "avx512", "scalar"), help="force a tensorslim code path")
    p.add_argument("--gathers", choices=("on", "off"),
                   help="input offsets per weight column: gathers or scalar loads (default: gathers on Intel)")
    p.add_argument("--model", action="store_true", help="a whole ResNet-18 instead of single layers")
    args = p.parse_args()
    if args.isa:
        ts._C.set_isa(args.isa)
    if args.gathers:
        ts._C.set_sparse_gathers(args.gathers == "on")
    torch.manual_seed(0)
    print(machine_line(f"tensorslim ISA {ts._C.kernel_isa()} (best {ts._C.best_isa()}), scattered reads by "
                       f"{'gathers' if ts._C.sparse_gathers() else 'scalar loads'}"
                       + ("; --isa caps tensorslim only, torch keeps its own ISA" if args.isa else "")))
    if args.model:
        bench_model(args.formats.split(","), [int(b) for b in args.batches.split(",")])
        return
    header = f"{'layer':>26} {'B':>2} | {'dense ms':>8} | " + " | ".join(f"{f:>5} ms  x dense" for f in
                                                                          args.formats.split(","))
    print(header)
    print("-" * len(header))
    for cin, cout, k, s, hw in LAYERS:
        dense = nn.Conv2d(cin, cout, k, s, k // 2).eval()
        sparse = []
        for fmt in args.formats.split(","):
            mod = nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2))
            mod.load_state_dict({"0." + key: v for key, v in dense.state_dict().items()})
            ts.sparsify(mod, config_for(fmt), progress=False)
            sparse.append(mod[0].eval())
        for B in (int(b) for b in args.batches.split(",")):
            x = torch.randn(B, cin, hw, hw)
            with torch.inference_mode():
                times = median_times([lambda: dense(x)] + [lambda m=m: m(x) for m in sparse], min_time=0.5)
            cells = " | ".join(f"{t * 1e3:8.3f} {times[0] / t:7.2f}x" for t in times[1:])
            print(f"{cin:>4} -> {cout:<4} {k}x{k} s{s} {hw:>3}x{hw:<3} {B:>2} | {times[0] * 1e3:8.3f} | {cells}",
                  flush=True)


if __name__ == "__main__":
    main()
