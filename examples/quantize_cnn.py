"""INT8 (W8A8) for a convolutional network, end to end on the CPU.

A small ResNet (basic blocks, tensorslim.eval.digits_basic_resnet) is trained a few epochs on
scikit-learn's digits, then `ts.quantize(model, ts.W8A8(), calib_data=...)`: BatchNorms are
folded into their convs, every conv gets INT8 weights (per output channel) and calibrated
INT8 activations, the ReLUs and residual adds that follow a conv run inside it, and a conv
feeding only the next conv hands it INT8 codes. Prints the Report, accuracy and latency
against fp32 at batch 1 and 32, then saves (safetensors) and loads into a fresh model.
At batch 1 this model's convs (16x16 and smaller) cost less than the work around each
kernel call, so W8A8 is no faster there; the gain is from batch 8 up (docs/conv.md).

    python examples/quantize_cnn.py        # ~20 s on 2 cores
"""
import copy
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.eval import digits_basic_resnet as D


def latency_ms(models, x, rounds: int = 30):
    """Median ms per call of each model on x, timed in interleaved rounds of random order."""
    times = [[] for _ in models]
    rng = random.Random(0)
    order = list(range(len(models)))
    with torch.inference_mode():
        for m in models:
            m(x)
        for _ in range(rounds):
            rng.shuffle(order)
            for i in order:
                t = time.perf_counter()
                models[i](x)
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


def main(epochs: int = 3, timing: bool = True) -> dict:
    xtr, ytr, xte, yte = D.digits_images()
    torch.manual_seed(0)
    fp32 = D.train(D.DigitsResNet(), xtr, ytr, epochs=epochs)

    model = copy.deepcopy(fp32)
    report = ts.quantize(model, ts.W8A8(), calib_data=list(xtr[:256].split(64)), progress=False)
    print(report)
    acc_fp32, acc_int8 = D.accuracy(fp32, xte, yte), D.accuracy(model, xte, yte)
    print(f"\ntest accuracy: fp32 {acc_fp32:.4f}, W8A8 {acc_int8:.4f}")

    if timing:
        for batch in (1, 32):
            t32, t8 = latency_ms([fp32, model], xte[:batch])
            print(f"batch {batch:>2}: fp32 {t32:.3f} ms, W8A8 {t8:.3f} ms ({t32 / t8:.2f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits_resnet.slim.safetensors"
        ts.save(model, path)
        fresh = ts.load(D.DigitsResNet().eval(), path)  # the float architecture, then the saved layers
        with torch.inference_mode():
            same = torch.equal(fresh(xte), model(xte))
        print(f"saved {path.stat().st_size / 1024:.0f} KiB; loaded model gives the same outputs: {same}")
    return {"acc_fp32": acc_fp32, "acc_int8": acc_int8, "loaded_same": same, "report": report}


if __name__ == "__main__":
    main()
