"""INT8 convolutions on the CPU: torch fp32 conv, torch's own int8 conv (torch.ao's quantized
Conv2d on the x86 / fbgemm engine, float in -> float out like ours, channels-last input, its
best case) and ours (W8A8 static, oneDNN, channels-last input as the previous int8 conv leaves
it; fp32 gets the NCHW input users have), at typical shapes, batch 1 and 32; then the whole
digits ResNet (eval/digits_basic_resnet.py), fp32 vs W8A8, and W8A8 with its ReLUs and residual
adds left as torch ops ("unfused") to show what fusing them into the convs gives; then
MobileNetV2-style blocks the same way. "wheel":
ours with every conv on the onednn wheel's runtime (ops/torch_onednn.py switched off), to
show what running large convs on torch's own oneDNN and threads gives. One run; ratios vs fp32.

    .venv/bin/python benchmarks/bench_conv.py [--isa avx2] [--batches 1 32]

--isa avx2 runs our kernels and oneDNN as on an AVX2 CPU without VNNI (7-bit activation codes).
"""
import argparse
import copy
import os
import sys

# (name, C, OC, kernel, stride, padding, groups, H = W)
SHAPES = [
    ("resnet 3x3 64->64", 64, 64, 3, 1, 1, 1, 56),
    ("resnet 1x1 256->64", 256, 64, 1, 1, 0, 1, 56),
    ("depthwise 3x3 144", 144, 144, 3, 1, 1, 144, 56),
    ("squeezenet 1x1 96->16", 96, 16, 1, 1, 0, 1, 55),
    ("squeezenet 1x1 16->64", 16, 64, 1, 1, 0, 1, 55),
]


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--isa", choices=["best", "avx2"], default="best")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the digits ResNet")
    return p.parse_args()


def torch_int8(conv, x):
    """torch.ao's quantized conv (static, per-channel weights) as a float -> float callable, or None."""
    import torch
    try:
        import torch.ao.nn.quantized as nnq
        torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
        lo, hi = float(x.min()), float(x.max())
        scale = (hi - lo) / 255
        zp = int(round(-lo / scale))
        w = conv.weight.detach()
        ws = w.abs().amax((1, 2, 3)) / 127
        qw = torch.quantize_per_channel(w, ws, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        q = nnq.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       groups=conv.groups)
        q.set_weight_bias(qw, conv.bias.detach() if conv.bias is not None else None)
        q.scale, q.zero_point = scale, zp  # output range: ours returns fp32, torch requantizes

        def run(inp):
            return q(torch.quantize_per_tensor(inp, scale, zp, torch.quint8)).dequantize()
        run(x)
        return run
    except Exception as e:  # no quantized engine in this torch build
        print(f"torch.ao int8 conv unavailable: {type(e).__name__}: {e}")
        return None


def main():
    args = parse()
    if args.isa == "avx2":  # before oneDNN starts: it reads this once
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
        os.environ["TENSORSLIM_ISA"] = "avx2"
    import torch
    from torch import nn

    import tensorslim as ts
    sys.path.insert(0, os.path.dirname(__file__))
    from timing import cpu_name, median_times
    from tensorslim.eval import digits_basic_resnet as D
    from tensorslim.ops import conv_int8 as C
    from tensorslim.ops import torch_onednn

    def on_wheel(fn):
        """fn with torch's-oneDNN route switched off for the call."""
        def run():
            previous = torch_onednn.set_enabled(False)
            try:
                return fn()
            finally:
                torch_onednn.set_enabled(previous)
        return run

    torch.manual_seed(0)
    print(f"{cpu_name()}, tensorslim ISA {ts._C.kernel_isa()}, ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()} (tensorslim: {ts._C.threading_backend()})")
    print("(--isa caps ours and every oneDNN, torch's fp32 conv included; torch.ao (fbgemm) runs at its best ISA)")
    print(f"{'shape':<24} {'batch':>5} {'fp32 ms':>9} {'torch.ao ms':>12} {'wheel ms':>9} {'ours ms':>9} "
          f"{'fp32/ours':>10} {'torch.ao/ours':>14}  kernel")  # speed-ups: the others' time over ours
    with torch.inference_mode():
        for name, c, oc, k, s, p, g, hw in SHAPES:
            conv = nn.Conv2d(c, oc, k, s, p, groups=g).eval()
            for n in args.batches:
                x = torch.randn(n, c, hw, hw).relu()  # post-ReLU activations, as convs see them
                model = nn.Sequential(nn.Conv2d(c, oc, k, s, p, groups=g))
                model[0].load_state_dict(conv.state_dict())
                ts.quantize(model, ts.W8A8(smoothquant=False, skip_output_head=False), calib_data=[x],
                            progress=False)
                ours = model[0]
                xcl = x.contiguous(memory_format=torch.channels_last)
                tq = torch_int8(conv, xcl)
                # ours and torch.ao read channels-last input, as a previous int8 conv leaves it
                fns = [lambda: conv(x), lambda: ours(xcl), on_wheel(lambda: ours(xcl))] + (
                    [lambda: tq(xcl)] if tq else [])
                times = median_times(fns, min_time=0.3, warmup=2, min_rounds=5)
                t32, t8, tw = times[0], times[1], times[2]
                tao = times[3] if tq else float("nan")
                impl = C.impl_name(torch.empty(n, hw, hw, c, dtype=torch.uint8), ours.qweight, ours.stride,
                                   ours.padding, ours.dilation, ours.groups, int(ours.act_zero_point), True)
                print(f"{name:<24} {n:>5} {t32 * 1e3:>9.3f} {tao * 1e3:>12.3f} {tw * 1e3:>9.3f} {t8 * 1e3:>9.3f} "
                      f"{t32 / t8:>9.2f}x {tao / t8:>13.2f}x  {impl}")
    print()
    xtr, ytr, xte, yte = D.digits_images()
    torch.manual_seed(0)
    fp32 = D.train(D.DigitsResNet(), xtr, ytr, epochs=args.epochs)
    q = D.DigitsResNet().eval()
    q.load_state_dict(fp32.state_dict())
    ts.quantize(q, ts.W8A8(), calib_data=list(xtr[:256].split(64)), progress=False)
    print(f"digits ResNet (width 32, 16x16, {args.epochs} epochs): test accuracy fp32 "
          f"{D.accuracy(fp32, xte, yte):.4f}, W8A8 {D.accuracy(q, xte, yte):.4f} (BatchNorm folded)")
    fused = sorted(n for n, m in q.named_modules() if getattr(m, "epilogue", ""))
    print(f"ReLU / residual add fused into {len(fused)} of 9 convs; 'unfused': the same W8A8 model running "
          f"those as torch ops")
    unfused = copy.deepcopy(q)
    for m in unfused.modules():
        m.__dict__.pop("forward", None)  # the model's own forward: epilogues as torch ops
    print(f"{'digits ResNet latency':<28} {'batch':>5} {'fp32 ms':>9} {'unfused ms':>11} {'wheel ms':>9} "
          f"{'w8a8 ms':>9} {'fp32/w8a8':>10} {'fp32/unfused':>13} {'fp32/wheel':>11}")
    with torch.inference_mode():
        for n in args.batches:
            x = xtr[:n]
            t32, tu, tw, t8 = median_times([lambda: fp32(x), lambda: unfused(x), on_wheel(lambda: q(x)),
                                            lambda: q(x)], min_time=0.5, warmup=3, min_rounds=9)
            print(f"{'':<28} {n:>5} {t32 * 1e3:>9.3f} {tu * 1e3:>11.3f} {tw * 1e3:>9.3f} {t8 * 1e3:>9.3f} "
                  f"{t32 / t8:>9.2f}x {t32 / tu:>12.2f}x {t32 / tw:>10.2f}x")
    mobilenet_blocks(args, ts, median_times)


def mobilenet_blocks(args, ts, median_times):
    """MobileNetV2-style inverted residual blocks nested as torchvision nests them (each conv
    with its BatchNorm and ReLU6 in a Sequential, inside the block's `conv` Sequential), W8A8
    against fp32: the epilogue pass traces through those Sequentials, so each block runs as
    one chain of three convs handing INT8 codes on, the residual add fused into the last."""
    import copy

    import torch
    from torch import nn

    def conv_bn(cin, cout, k, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU6(inplace=True)] if act else []))

    class Inverted(nn.Module):
        def __init__(self, c=32, hidden=96):
            super().__init__()
            self.conv = nn.Sequential(conv_bn(c, hidden, 1), conv_bn(hidden, hidden, 3, groups=hidden),
                                      *conv_bn(hidden, c, 1, act=False))

        def forward(self, x):
            return x + self.conv(x)

    torch.manual_seed(0)
    fp32 = nn.Sequential(conv_bn(3, 32, 3), *[Inverted() for _ in range(4)], nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))
    for m in fp32.modules():  # untrained: BatchNorm statistics of a trained-looking spread
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    fp32.eval()
    q = copy.deepcopy(fp32)
    ts.quantize(q, ts.W8A8(), calib_data=[torch.randn(32, 3, 16, 16)], progress=False)
    unfused = copy.deepcopy(q)
    for m in unfused.modules():
        m.__dict__.pop("forward", None)
    print(f"\nMobileNetV2-style blocks (4 x 32 -> 96 -> 32 at 16x16, untrained), W8A8; 'unfused': the same model's "
          f"ReLU6s, adds and hand-overs as torch ops")
    print(f"{'mobilenet blocks latency':<28} {'batch':>5} {'fp32 ms':>9} {'unfused ms':>11} {'w8a8 ms':>9} "
          f"{'fp32/w8a8':>10} {'fp32/unfused':>13}")
    with torch.inference_mode():
        for n in args.batches:
            x = torch.randn(n, 3, 16, 16)
            t32, tu, t8 = median_times([lambda: fp32(x), lambda: unfused(x), lambda: q(x)], min_time=0.5, warmup=3,
                                       min_rounds=9)
            print(f"{'':<28} {n:>5} {t32 * 1e3:>9.3f} {tu * 1e3:>11.3f} {t8 * 1e3:>9.3f} {t32 / t8:>9.2f}x "
                  f"{t32 / tu:>12.2f}x")


if __name__ == "__main__":
    main()
