"""transformers' Mixtral or GPT-OSS (mixture-of-experts decoders) compressed, fp32 against each
recipe (their fused experts unfused into a linear per expert, docs/layer_coverage.md), eval under
torch.inference_mode, median of interleaved rounds, one run (random weights: speed only).
Also prints each model's weight bytes.

    python benchmarks/bench_moe.py [--arch mixtral|gpt_oss] [--hidden 1024] [--intermediate 2816]
        [--experts 8] [--top-k 2] [--layers 2] [--shapes 1x1,1x32,4x128] [--recipes int8,int4,int8dyn]
        [--isa avx2]
"""
import argparse

from isa_option import cap_from_argv

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402

import tensorslim as ts  # noqa: E402
from timing import batch_tokens, compressed_copies, median_times, parse_shapes_and_recipes, print_header  # noqa: E402

RECIPES = {
    "int8": lambda m, calib: ts.quantize(m, ts.Int8WeightOnly(), progress=False),
    "int4": lambda m, calib: ts.quantize(m, ts.Int4WeightOnly(group_size=128), progress=False),
    "int8dyn": lambda m, calib: ts.quantize(m, ts.Int8Dynamic(), progress=False),
}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--arch", choices=("mixtral", "gpt_oss"), default="mixtral")
    args, names = parse_shapes_and_recipes(p, "1x1,1x32,4x128", RECIPES, "int8,int4,int8dyn")
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                  num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=512)
    if args.arch == "mixtral":
        dense = transformers.MixtralModel(transformers.MixtralConfig(**common)).eval()
    else:  # gate and up interleaved, biases, a clamped SwiGLU; plain RoPE (YaRN's factor needs 128K positions)
        cfg = transformers.GptOssConfig(**common, head_dim=args.hidden // 16,
                                        rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
        dense = transformers.GptOssModel(cfg).eval()
    print(f"{type(dense).__name__}: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of "
          f"{args.intermediate}, top-{args.top_k}, experts implementation "
          f"{dense.config._experts_implementation!r}; eval, inference_mode")
    models = compressed_copies(dense, RECIPES, names, None)
    print("weights: " + ", ".join(f"{n} {weight_bytes(m) / 2**20:.1f}" for n, m in
                                       {"fp32": dense, **models}.items()) + " MiB\n")
    print_header(f"{'batch x tokens':>14} {'fp32 ms':>8} | " + " | ".join(f"{n}: ms, x fp32" for n in models))
    with torch.inference_mode():
        for shape, b, t in batch_tokens(args.shapes):
            ids = torch.randint(0, 512, (b, t))
            fns = [lambda: dense(input_ids=ids)] + [lambda m=m: m(input_ids=ids) for m in models.values()]
            times = median_times(fns, min_time=2.0, min_rounds=5)
            cells = [f"{times[i] * 1e3:.2f}, {times[0] / times[i]:.2f}x" for i in range(1, len(times))]
            print(f"{shape:>14} {times[0] * 1e3:8.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
