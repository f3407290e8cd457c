"""One small layer of every compressed module kind, built the way users build them
(ts.quantize or ts.sparsify with the matching config), for the tests that loop over every kind."""
import torch
from torch import nn

import tensorslim as ts

IN, OUT = 64, 32

# kind -> config; "int4_input_scaled" is a WeightOnlyLinear with an input scale (as AWQ leaves
# one where no earlier layer can absorb it), built from codes.
KINDS = {
    "int8_weight_only": lambda: ts.Int8WeightOnly(),
    "int4_g32": lambda: ts.Int4WeightOnly(group_size=32),
    "uint4_g32": lambda: ts.Int4WeightOnly(group_size=32, symmetric=False),
    "int4_input_scaled": None,
    "fp8_e4m3": lambda: ts.FP8WeightOnly(),
    "nvfp4": lambda: ts.NVFP4(),
    "mxfp4": lambda: ts.MXFP4(),
    "w8a8_static": lambda: ts.W8A8(smoothquant=False),
    "w8a8_smoothed": lambda: ts.W8A8(smoothquant_alpha=0.5),  # one layer: 1/s kept in the module
    "int8_dynamic": lambda: ts.Int8Dynamic(),
    "w4a8": lambda: ts.W4A8(group_size=32),
    "binary": lambda: ts.Binary(),
    "xnor": lambda: ts.Binary(activations=True),
    "ternary": lambda: ts.Ternary(),
    "sparse_2_4": lambda: ts.NM(2, 4),
    "sparse_4_8_int8": lambda: ts.NM(4, 8, values="int8"),
    "sparse_csr_90": lambda: ts.Unstructured(0.9),
}

# kinds whose kernels quantize the activations (they need finite inputs)
QUANTIZED_ACTIVATIONS = {"w8a8_static", "w8a8_smoothed", "int8_dynamic", "w4a8"}


def calib(seed: int = 0, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, IN, generator=g) for _ in range(n)]


# kinds that keep only some weights: an input column with no kept weight in a row never reaches
# that output (a NaN there stays out of it, unlike F.linear's 0 * NaN)
SPARSE = {"sparse_2_4", "sparse_4_8_int8", "sparse_csr_90"}


def compress(model: nn.Module, cfg, data):
    """The verb a config belongs to: ts.sparsify for sparsity configs, else ts.quantize."""
    if isinstance(cfg, (ts.NM, ts.Unstructured)):
        return ts.sparsify(model, cfg, calib_data=data, progress=False)
    return ts.quantize(model, cfg, calib_data=data, progress=False)


def build(kind: str, seed: int = 0) -> nn.Module:
    """The compressed layer of `kind` made from a seeded nn.Linear(IN, OUT)."""
    torch.manual_seed(seed)
    if KINDS[kind] is None:
        codes = torch.randint(-8, 8, (OUT, IN))
        return ts.WeightOnlyLinear.from_codes(codes, torch.rand(OUT, IN // 32) * 0.05 + 0.01, None, "int4", 32,
                                              bias=torch.randn(OUT), input_scale=torch.rand(IN) + 0.5)
    model = nn.Sequential(nn.Linear(IN, OUT))
    compress(model, KINDS[kind](), calib(seed))
    layer = model[0]
    assert isinstance(layer, ts.nn.CompressedLinear), f"{kind}: got {type(layer).__name__}"
    return layer


def weight_in_original_domain(layer: nn.Module) -> torch.Tensor:
    """float64 [out, in] weight the layer applies to its input, built from the public pieces
    (dequantized_weight, and the input scale where the layer has one)."""
    w = layer.dequantized_weight().double()
    scale = getattr(layer, "input_scale", None)
    return w * scale.double()[None, :] if scale is not None else w
