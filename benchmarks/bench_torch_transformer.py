"""torch's own nn.TransformerEncoder compressed: fp32 (torch's fused fast path) against each
recipe, eval under torch.inference_mode, median of interleaved rounds, one run.

The "int8dyn via torch's fused path" row is what ts.quantize gave before nn.MultiheadAttention
was unpacked (docs/layer_coverage.md): the feed-forward layers compressed, the attention left
packed, so nn.TransformerEncoderLayer's fast path read the compressed layers' dequantized
`.weight` on every call.

    python benchmarks/bench_torch_transformer.py [--width 512] [--heads 8] [--ffn 2048]
        [--layers 4] [--shapes 1x64,8x64,32x128] [--recipes int8dyn,w8a8,int4,nm,prune25,prune25+int8dyn]
        [--isa avx2]
"""
import argparse
import copy

from isa_option import cap_from_argv

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tensorslim as ts  # noqa: E402
from timing import (batch_tokens, compressed_copies, median_times, parse_shapes_and_recipes,  # noqa: E402
                    print_header)

RECIPES = {
    "int8dyn": lambda m, calib: ts.quantize(m, ts.Int8Dynamic(), progress=False),
    "w8a8": lambda m, calib: ts.quantize(m, ts.W8A8(), calib, progress=False),
    "int4": lambda m, calib: ts.quantize(m, ts.Int4WeightOnly(group_size=128), progress=False),
    "nm": lambda m, calib: ts.sparsify(m, ts.NM(2, 4), progress=False),
    # a quarter of the heads and FFN neurons removed (ChannelPrune unpacks the attentions), then INT8
    "prune25": lambda m, calib: ts.prune(m, ts.ChannelPrune(ratio=0.25), example_inputs=(calib[0],),
                                         progress=False),
    "prune25+int8dyn": lambda m, calib: (RECIPES["prune25"](m, calib), RECIPES["int8dyn"](m, calib)),
}


def fused_path_int8dyn(dense: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """The feed-forward layers INT8, the attention packed as torch's: what users got before."""
    m = copy.deepcopy(dense)
    attention = [layer.self_attn for layer in m.layers]
    ts.quantize(m, ts.Int8Dynamic(exclude=["*self_attn*"]), progress=False)
    for layer, attn in zip(m.layers, attention):
        layer.self_attn = attn
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    args, names = parse_shapes_and_recipes(p, "1x64,8x64,32x128", RECIPES,
                                           "int8dyn,w8a8,int4,nm,prune25,prune25+int8dyn")
    torch.manual_seed(0)
    print(f"nn.TransformerEncoder: {args.layers} layers, width {args.width}, {args.heads} heads, "
          f"FFN {args.ffn}, batch_first, eval, torch.inference_mode\n")
    layer = nn.TransformerEncoderLayer(args.width, args.heads, args.ffn, batch_first=True, dropout=0.0)
    dense = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False).eval()
    calib = [torch.randn(4, 64, args.width) for _ in range(4)]
    models = {"int8dyn via torch's fused path": fused_path_int8dyn(dense),
              **compressed_copies(dense, RECIPES, names, calib)}
    print_header(f"{'batch x tokens':>14} {'fp32 ms':>8} | " + " | ".join(f"{n}: ms, x fp32" for n in models))
    with torch.inference_mode():
        for shape, b, t in batch_tokens(args.shapes):
            x = torch.randn(b, t, args.width)
            fns = [lambda m=m: m(x) for m in [dense, *models.values()]]
            times = median_times(fns, min_time=2.0, min_rounds=5)
            print(f"{shape:>14} {times[0] * 1e3:8.2f} | " + " | ".join(
                f"{tm * 1e3:.2f}, {times[0] / tm:.2f}x" for tm in times[1:]))


if __name__ == "__main__":
    main()
