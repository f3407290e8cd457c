"""transformers' ViT (ViT-B/16 width) with heads and FFN neurons pruned and / or INT8, fp32
against each recipe, eval under torch.inference_mode, median of interleaved rounds, one run
(random weights: speed only).

ChannelPrune removes whole heads of ViTAttention (q / k / v rows, o_proj columns,
num_attention_heads updated) and FFN neurons of its MLP (docs/pruning.md): "prune25" takes 3 of
12 heads and a quarter of the neurons in every layer.

    python benchmarks/bench_vit.py [--layers 4] [--image 224] [--batches 1,8]
        [--recipes prune25,prune25+int8dyn,int8dyn] [--isa avx2]
"""
import argparse

from isa_option import cap_from_argv

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402

import tensorslim as ts  # noqa: E402
from timing import compressed_copies, median_times, print_header, recipe_names, machine_line  # noqa: E402

RECIPES = {
    "int8dyn": lambda m, calib: ts.quantize(m, ts.Int8Dynamic(), progress=False),
    "prune25": lambda m, calib: ts.prune(m, ts.ChannelPrune(ratio=0.25), example_inputs={"pixel_values": calib},
                                         progress=False),
    "prune25+int8dyn": lambda m, calib: (RECIPES["prune25"](m, calib), RECIPES["int8dyn"](m, calib)),
}


def main():
    from isa_option import add_argument, check

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--recipes", default="prune25,prune25+int8dyn,int8dyn")
    add_argument(p)
    args = p.parse_args()
    isa_line = check(args)
    names = recipe_names(p, args.recipes, RECIPES)
    print(machine_line(isa_line))
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=768, num_hidden_layers=args.layers, num_attention_heads=12,
                                 intermediate_size=3072, image_size=args.image, patch_size=16)
    dense = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    tokens = (args.image // 16) ** 2 + 1
    print(f"ViT: {args.layers} layers, width 768, 12 heads, FFN 3072, {tokens} tokens; eval, inference_mode\n")
    models = compressed_copies(dense, RECIPES, names, torch.randn(2, 3, args.image, args.image))
    for name, m in models.items():
        att = m.layers[0].attention
        print(f"{name}: heads {att.num_attention_heads}, FFN {m.layers[0].mlp.fc1.out_features}, "
              f"state {sum(t.numel() * t.element_size() for t in m.state_dict().values()) / 2 ** 20:.1f} MiB")
    print(f"fp32: state {sum(t.numel() * t.element_size() for t in dense.state_dict().values()) / 2 ** 20:.1f} MiB\n")
    print_header(f"{'batch':>5} {'fp32 ms':>8} | " + " | ".join(f"{n}: ms, x fp32" for n in models))
    with torch.inference_mode():
        for b in (int(v) for v in args.batches.split(",")):
            px = torch.randn(b, 3, args.image, args.image)
            fns = [lambda: dense(pixel_values=px)] + [lambda m=m: m(pixel_values=px) for m in models.values()]
            times = median_times(fns, min_time=2.0, min_rounds=5)
            base = times[0]
            print(f"{b:>5} {base * 1e3:8.2f} | " + " | ".join(f"{t * 1e3:.2f}, {base / t:.2f}x" for t in times[1:]))


if __name__ == "__main__":
    main()
