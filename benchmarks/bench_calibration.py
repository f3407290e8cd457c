"""Calibrated low-bit weights: perplexity and calibration time per method, and the peak
memory of the block-by-block pipeline against the model's size, measured in one run.

0. Cores: the C++ GPTQ loop and AWQ searches against their plain-PyTorch references on
   one weight matrix (3 * width x width), time and speed-up.
1. Quality: the tiny byte-level LLaMA trained on pydoc text (tests/data), held-out
   perplexity for fp32, round to nearest, AWQ, GPTQ and GPTQ fitting the float outputs
   (gptq-fit) at INT4 g128 and INT3 g128 (symmetric), with calibration wall time and the
   increase over fp32 relative to round to nearest. Weights are simulated (the exact values
   the packed layers hold).
2. Memory: a larger LLaMA (random weights; default 6 layers of width 512, ~90 MB fp32)
   quantized with GPTQ / GPTQ-fit / AWQ in a fresh subprocess each; a sampling thread records the
   resident set size, and the table prints the peak above the loaded model, as a fraction
   of the model's fp32 size. Copying the model (what a pipeline that keeps a float
   reference would do) costs 1.0x by itself; block by block needs one block plus
   activations.

    python benchmarks/bench_calibration.py [--eval-tokens 16384] [--calib 32] [--layers 6 --width 512]

3. --split (only this): plain forward time over N x 512 calibration tokens of a width-576 LLaMA
   (4 blocks, N = 16 unless --layers / --calib / --seq say otherwise), and per method (GPTQ, AWQ
   INT4, --group 64) the calibration time, its ratio to that forward time and its split into
   block forwards, statistics, search / solve and the rest (calib_split.py).

    python benchmarks/bench_calibration.py --split [--calib 16] [--layers 4] [--threads 1]
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time

import torch
from torch import nn


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples the resident set size every few milliseconds while active."""

    def __init__(self, period=0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------- quality table


def quality(eval_tokens: int, n_calib: int, seq: int = 128):
    from tensorslim.eval import perplexity, tiny_lm
    from tensorslim.ops import calibration as C
    from tensorslim.quantization import awq, gptq
    from tensorslim.quantization.blockwise import WeightSpec
    from tensorslim.quantization.calibrate import make_forward_loop

    model = tiny_lm.load_tiny_lm()
    train, held_out = tiny_lm.train_eval_split()
    held_out = held_out[:eval_tokens]
    gen = torch.Generator().manual_seed(1)
    calib = [train[i:i + seq][None] for i in torch.randint(0, len(train) - seq, (n_calib,), generator=gen)]
    base = perplexity(model, held_out, seq_len=seq)
    rows = [("fp32", "-", base, 0.0)]
    for bits in (4, 3):
        # Simulated weights (quantized-dequantized float Linear layers): exactly the values the
        # packed layers hold (tests/python/test_gptq.py checks this), without the kernels' rounding.
        spec = WeightSpec(bits, True, 128, simulate=True)
        for method in ("rtn", "awq", "gptq", "gptq-fit"):
            q = copy.deepcopy(model)
            start = time.perf_counter()
            if method == "rtn":
                for name, mod in q.named_modules():
                    if type(mod) is nn.Linear and name != "lm_head":
                        with torch.no_grad():
                            mod.weight.copy_(C.fake_quant_reference(mod.weight, bits, True, 128))
            elif method == "awq":
                awq.quantize_awq(q, spec, make_forward_loop(calib, progress=False), progress=False)
            else:  # gptq-fit: GPTQ(fit_float_outputs=True)
                gptq.quantize_gptq(q, spec, make_forward_loop(calib, progress=False), progress=False,
                                   fit_float=method == "gptq-fit")
            elapsed = time.perf_counter() - start
            rows.append((method, f"int{bits} g128", perplexity(q, held_out, seq_len=seq), elapsed))
    print(f"\nTiny LLaMA (3 layers, width 128, byte vocab) on {len(held_out)} held-out pydoc bytes, "
          f"{n_calib} x {seq} calibration tokens, torch threads {torch.get_num_threads()}")
    print(f"{'method':<8} {'weights':<22} {'perplexity':>10} {'increase':>9} {'vs rtn':>7} {'calib s':>8}")
    rtn_increase = {}
    for method, label, ppl, elapsed in rows:
        inc = ppl - base
        if method == "rtn":
            rtn_increase[label] = inc
        ratio = f"{inc / rtn_increase[label]:.2f}" if label in rtn_increase and method != "fp32" else "-"
        print(f"{method:<8} {label:<22} {ppl:>10.4f} {inc:>+9.4f} {ratio:>7} {elapsed:>8.1f}")


# ---------------------------------------------------------------- core speed


def core_speed(rows: int, cols: int, tokens: int = 2048):
    """The C++ cores against their plain-PyTorch references (same algorithm, same results)."""
    from tensorslim.ops import calibration as C

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, cols, generator=gen) @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=gen))
    w = torch.randn(rows, cols, generator=gen)
    g = (x.double().T @ x.double() / tokens).float()
    act = x.abs().mean(0)
    cases = [
        ("gptq int4 g128", lambda b: C.gptq_quantize(w, 2 * g, 4, True, 128, backend=b)),
        ("awq scale search (20 alphas)", lambda b: C.awq_search_scale(w, g, act, 4, True, 128, backend=b)),
        ("awq clip search (10 ratios)", lambda b: C.awq_search_clip(w, g, 4, True, 128, backend=b)),
    ]
    print(f"\nCalibration cores, weight {rows} x {cols}, torch threads {torch.get_num_threads()}, "
          f"native threads {__import__('tensorslim')._C.num_threads()}")
    print(f"{'core':<30} {'pytorch ref s':>13} {'C++ s':>8} {'speed-up':>9}")
    for name, fn in cases:
        t = time.perf_counter()
        fn("reference")
        ref = time.perf_counter() - t
        fn("auto")  # warm-up
        t = time.perf_counter()
        fn("auto")
        ours = time.perf_counter() - t
        print(f"{name:<30} {ref:>13.2f} {ours:>8.2f} {ref / ours:>8.1f}x")


# ---------------------------------------------------------------- memory table


def _big_llama(layers: int, width: int, intermediate: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=intermediate or width * 3,
                      num_hidden_layers=layers, num_attention_heads=width // 64,
                      num_key_value_heads=width // 64, max_position_embeddings=512, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def memory_child(method: str, layers: int, width: int, n_calib: int, seq: int) -> dict:
    import tensorslim as ts

    model = _big_llama(layers, width)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = [torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(i)) for i in range(n_calib)]
    with torch.no_grad():  # warm-up: one-time library buffers are not calibration's
        model(calib[0])
        # the first packed-layer forward initializes oneDNN's runtime (~170 MiB here, once)
        ts.WeightOnlyLinear.from_linear(nn.Linear(width, width), "int4", 128)(calib[0].float().new_ones(seq, width))
    base = rss_bytes()
    with PeakRss() as peak:
        start = time.perf_counter()
        if method == "copy":
            ref = copy.deepcopy(model)  # the cost of keeping a float copy, for comparison
            del ref
        else:
            cfg = (ts.GPTQ(group_size=128, fit_float_outputs=True) if method == "gptq-fit"
                   else ts.Int4WeightOnly(group_size=128, algorithm=method))
            ts.quantize(model, cfg, calib_data=calib, progress=False)
        elapsed = time.perf_counter() - start
    return {"method": method, "model_bytes": model_bytes, "peak_extra": peak.peak - base, "seconds": elapsed}


def memory(layers: int, width: int, n_calib: int, seq: int):
    rows = []
    for method in ("copy", "gptq", "gptq-fit", "awq"):
        # glibc would keep freed blocks in its heap (RSS = high-water mark, not live memory):
        # a fixed mmap threshold returns every block above 64 KiB to the system when freed.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        out = subprocess.run([sys.executable, __file__, "--memory-child", method, "--layers", str(layers),
                              "--width", str(width), "--calib", str(n_calib), "--seq", str(seq)],
                             capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = rows[0]["model_bytes"]
    acts = n_calib * seq * width * 4
    print(f"\nPeak memory, LLaMA {layers} layers x width {width} (fp32 {mb / 2**20:.0f} MiB, one block "
          f"{mb / layers / 2**20:.0f} MiB), {n_calib} x {seq} calibration tokens "
          f"(one block's inputs {acts / 2**20:.0f} MiB)")
    print(f"{'what':<28} {'peak above model':>17} {'x model size':>13} {'seconds':>8}")
    for r in rows:
        what = "deepcopy of the model" if r["method"] == "copy" else f"ts.quantize int4 {r['method']}"
        print(f"{what:<28} {r['peak_extra'] / 2**20:>13.0f} MiB {r['peak_extra'] / mb:>13.2f} {r['seconds']:>8.1f}")


def split(args):
    """Width 576 (9 heads, intermediate 1536), --layers blocks (4 unless given), N x 512 tokens."""
    from calib_split import run_split

    layers = args.layers if args.layers != 6 else 4
    seq = args.seq if args.seq != 128 else 512
    n = args.calib if args.calib != 32 else 16
    calib = [torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(i)) for i in range(n)]
    print(f"LLaMA {layers} layers, width 576, intermediate 1536, INT4 g{args.group}")
    run_split(lambda: _big_llama(layers, 576, 1536), calib, args.group)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-cores", action="store_true")
    ap.add_argument("--memory-child", default=None)
    ap.add_argument("--split", action="store_true",
                    help="only the time split of GPTQ / AWQ calibration (see calib_split.py)")
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.split:
        split(args)
        return
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.layers, args.width, args.calib, args.seq)))
        return
    if not args.skip_quality:
        quality(args.eval_tokens, args.calib, args.seq)
    if not args.skip_cores:
        core_speed(3 * args.width, args.width)
    if not args.skip_memory:
        memory(args.layers, args.width, args.calib, args.seq)


if __name__ == "__main__":
    main()
