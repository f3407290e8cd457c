"""transformers' T5 encoder compressed, fp32 against each recipe, eval under
torch.inference_mode, median of interleaved rounds, one run (random weights: speed only).

T5's feed-forward reads `wo.weight.dtype` twice per layer and call. The "as before" column
runs the same compressed model with `.weight` dequantizing the whole matrix on each read, as it
did before compressed layers' `.weight` became lazy (docs/layer_coverage.md).

    python benchmarks/bench_t5.py [--d-model 512] [--d-ff 2048] [--layers 4] [--shapes 1x32,8x128]
        [--recipes int8dyn,int4,w8a8] [--isa avx2]
"""
import argparse

from isa_option import cap_from_argv

cap_from_argv()  # before torch / tensorslim load: they read the ISA caps at start

import torch  # noqa: E402

import tensorslim as ts  # noqa: E402
from tensorslim.nn.compressed_linear import CompressedLinear  # noqa: E402
from timing import (batch_tokens, compressed_copies, median_times, parse_shapes_and_recipes,  # noqa: E402
                    print_header)

RECIPES = {
    "int8dyn": lambda m, calib: ts.quantize(m, ts.Int8Dynamic(), progress=False),
    "int4": lambda m, calib: ts.quantize(m, ts.Int4WeightOnly(group_size=128), progress=False),
    "w8a8": lambda m, calib: ts.quantize(m, ts.W8A8(), calib, progress=False),
}
EAGER_WEIGHT = property(lambda self: self.effective_weight().detach().to(self.compute_dtype))


def as_before(model):
    """A call of `model` with `.weight` dequantized on every read."""
    lazy = CompressedLinear.weight

    def call(**inputs):
        CompressedLinear.weight = EAGER_WEIGHT
        try:
            return model(**inputs)
        finally:
            CompressedLinear.weight = lazy
    return call


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    args, names = parse_shapes_and_recipes(p, "1x32,8x128", RECIPES, "int8dyn,int4,w8a8")
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=512, d_model=args.d_model, d_kv=args.d_model // 8, d_ff=args.d_ff,
                                num_layers=args.layers, num_heads=8, decoder_start_token_id=0)
    dense = transformers.T5EncoderModel(cfg).eval()
    print(f"T5 encoder: {args.layers} layers, d_model {args.d_model}, d_ff {args.d_ff}; eval, inference_mode\n")
    calib = [{"input_ids": torch.randint(0, 512, (4, 32))} for _ in range(4)]
    models = compressed_copies(dense, RECIPES, names, calib)
    print_header(f"{'batch x tokens':>14} {'fp32 ms':>8} | " + " | ".join(
        f"{n}: ms, x fp32 (as before: ms, x fp32)" for n in models))
    with torch.inference_mode():
        for shape, b, t in batch_tokens(args.shapes):
            ids = torch.randint(0, 512, (b, t))
            fns = [lambda: dense(input_ids=ids)]
            for m in models.values():
                fns += [lambda m=m: m(input_ids=ids), lambda m=m: as_before(m)(input_ids=ids)]
            times = median_times(fns, min_time=2.0, min_rounds=5)
            base = times[0]
            cells = [f"{times[i] * 1e3:.2f}, {base / times[i]:.2f}x ({times[i + 1] * 1e3:.2f}, "
                     f"{base / times[i + 1]:.2f}x)" for i in range(1, len(times), 2)]
            print(f"{shape:>14} {base * 1e3:8.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
