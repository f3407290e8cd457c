"""Peak memory of each verb on a LLaMA-style model (random weights), one fresh process per case.

A user compressing a 1-70B model on a CPU needs the peak near (float model + compressed copy),
not multiples of it. Each case builds the model, resets the peak RSS (/proc/self/clear_refs),
runs one step and prints the peak above what the process held before it, beside the float
model's size, and the process's whole peak (build included: what a load route costs). The
baselines: transformers' own from_pretrained for loading, the float model for the verbs.

    python benchmarks/bench_memory.py [--layers 4] [--hidden 1024] [--cases all]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

GiB = 2 ** 30
CASES = ["int8", "int4", "int8dyn", "nm24", "svd_rank", "svd_energy", "save", "load", "load_empty",
         "ts_from_pretrained", "hf_from_pretrained"]


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux 4.0+)


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                       num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                       vocab_size=32000, max_position_embeddings=512)


def run_case(args) -> dict:
    import gc

    import torch
    from transformers import LlamaForCausalLM

    import tensorslim as ts

    torch.manual_seed(0)
    case, work = args.case, args.work
    out = {"case": case}
    verbs = {
        "int8": lambda m: ts.quantize(m, ts.Int8WeightOnly(), progress=False),
        "int4": lambda m: ts.quantize(m, ts.Int4WeightOnly(group_size=128), progress=False),
        "int8dyn": lambda m: ts.quantize(m, ts.Int8Dynamic(), progress=False),
        "nm24": lambda m: ts.sparsify(m, ts.NM(2, 4), progress=False),
        "svd_rank": lambda m: ts.factorize(m, ts.SVD(rank=args.hidden // 8), progress=False),
        "svd_energy": lambda m: ts.factorize(m, ts.SVD(energy=0.9), progress=False),
    }
    if case in ("ts_from_pretrained", "hf_from_pretrained"):
        model = None
        step = {"ts_from_pretrained": lambda: ts.from_pretrained(LlamaForCausalLM, f"{work}/hf"),
                "hf_from_pretrained": lambda: LlamaForCausalLM.from_pretrained(f"{work}/hf")}[case]
    elif case == "load_empty":
        with ts.empty_parameters():
            model = LlamaForCausalLM(_config(args)).eval()
        step = lambda: ts.load(model, f"{work}/int4.safetensors")  # noqa: E731
    else:
        model = LlamaForCausalLM(_config(args)).eval()
        if case == "save":
            ts.quantize(model, ts.Int4WeightOnly(group_size=128), progress=False)
            step = lambda: ts.save(model, f"{work}/again.safetensors")  # noqa: E731
        elif case == "load":
            step = lambda: ts.load(model, f"{work}/int4.safetensors")  # noqa: E731
        else:
            step = lambda: verbs[case](model)  # noqa: E731
    gc.collect()
    before, build_peak = _rss("VmRSS"), _rss("VmHWM")
    _reset_peak()
    result = step()
    out["peak_above_GiB"] = (_rss("VmHWM") - before) / GiB
    out["process_peak_GiB"] = max(build_peak, _rss("VmHWM")) / GiB
    held = model if model is not None else result
    out["model_after_GiB"] = sum(t.numel() * t.element_size() for t in held.state_dict().values()) / GiB
    return out


def prepare(args) -> None:
    """The INT4 files the load cases read: ts.save and save_pretrained of one quantized model."""
    import torch
    from transformers import LlamaForCausalLM

    import tensorslim as ts

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(args)).eval()
    fp32 = sum(p.numel() * 4 for p in model.parameters()) / GiB
    ts.quantize(model, ts.Int4WeightOnly(group_size=128), progress=False)
    ts.save(model, f"{args.work}/int4.safetensors")
    model.save_pretrained(f"{args.work}/hf")
    print(json.dumps({"fp32_GiB": fp32}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--cases", default="all", help=f"comma separated, of {CASES}")
    p.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case == "prepare":
        prepare(args)
        return
    if args.case:
        print(json.dumps(run_case(args)))
        return
    cases = CASES if args.cases == "all" else args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {CASES}")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    common = [sys.executable, __file__, "--layers", str(args.layers), "--hidden", str(args.hidden)]
    print(f"LLaMA-style model: {args.layers} layers, hidden {args.hidden}, vocab 32000; peak RSS above "
          f"the process's RSS before the step, one process per case\n")
    with tempfile.TemporaryDirectory() as work:
        made = subprocess.run(common + ["--case", "prepare", "--work", work], check=True, env=env,
                              capture_output=True, text=True)
        fp32 = json.loads(made.stdout.strip().splitlines()[-1])["fp32_GiB"]
        print(f"fp32 parameters: {fp32:.3f} GiB\n")
        print(f"{'case':>20} {'peak above GiB':>15} {'x fp32':>7} {'process peak GiB':>17} {'model after GiB':>16}")
        for case in cases:
            res = subprocess.run(common + ["--case", case, "--work", work], check=True, env=env,
                                 capture_output=True, text=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{case:>20} {row['peak_above_GiB']:15.3f} {row['peak_above_GiB'] / fp32:7.2f} "
                  f"{row['process_peak_GiB']:17.3f} {row['model_after_GiB']:16.3f}")


if __name__ == "__main__":
    main()
