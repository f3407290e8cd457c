"""Weight-only and sparse linears at large batches on the CPU: decode a small weight once with
our kernel, then multiply with torch's own fp32 GEMM, the one the uncompressed model runs, on
torch's threads (sparse layers: see SPARSE_MIN_DENSITY).

With M rows the product costs M x K x N multiply-adds against K x N decodes, and a decoded
weight of up to SMALL_WEIGHT values (4 MiB; MiniLM's layers) stays in cache, so from
DECODE_GEMM_MIN_ROWS rows the GEMM sets the speed: MiniLM at batch 32 ran at 0.61-0.64x fp32
on our panel GEMM and on oneDNN's weight-decompression matmul (Sapphire Rapids, AVX-512), at
~0.9x this way. Larger weights stay on the C++ dispatch (our panel GEMM, decoding one K block
at a time; on AVX-512 oneDNN from 1024 rows, from 128 where it runs AMX): decoding 4096 x 4096
whole for 32 rows wrote and re-read 64 MiB, 26 ms against 9 ms for fp32.
Below 64 rows the C++ panel GEMM was faster (its rows-dot kernel, src/cpu/panel_gemm_tiles.h,
where the activations are small): at 32-48 rows of MiniLM's 384 x 1536 and 1536 x 384 INT4,
0.85-1.03x fp32 against 0.62-0.73x this way.

On AMD Zen the panel GEMM wins up to a few thousand rows (decode_min_rows): 2-core Zen 4,
median of interleaved rounds, x fp32 for decode + torch's GEMM / the panel GEMM, int4 g128 at
64 / 256 / 1024 / 3072 rows: 384 x 384 0.67 / 0.90, 0.87 / 1.07, 0.90 / 1.08, 0.95 / 1.12;
512 x 2048 0.86 / 1.21, 0.94 / 1.16, 0.96 / 1.12, 0.95 / 1.11 (six MiniLM-like shapes; int8,
fp8, nvfp4 and int3 alike, fp8 and nvfp4 at 64 rows 0.41-0.78 against 1.02-1.31; capped at
AVX2 int4 / int8 0.67-0.97 against 0.78-1.19); at 4096 / 8192 rows the route wins, 0.97-1.01
against 0.86-0.95 / 0.69-0.89 (docs/benchmarks.md, twenty-sixth session). A 4-layer
nn.TransformerEncoder (width 512) in int4 had run at 0.64x fp32 for 64 tokens on the route.
The Sapphire Rapids figures above were not measured again, so other CPUs keep 64 rows.

fp32 activations only: a bf16 GEMM would need a bf16 weight, rounding the decoded values.
Not in a fork() child: torch's GEMM runs on GNU OpenMP, whose parent team is not there
(an fp32 nn.Linear hangs in such a child too); our kernels start their own threads.
"""
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._native import _C

DECODE_GEMM_MIN_ROWS = 64
AMD_DECODE_GEMM_MIN_ROWS = 4096
SMALL_WEIGHT = 1 << 20  # values; the C++ dispatch (src/cpu/panel_gemm.h kPanelSmallWeight) uses the same


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it ('AuthenticAMD', 'GenuineIntel'); '' elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def decode_min_rows() -> int:
    """Rows from which small weight-only layers decode: AMD_DECODE_GEMM_MIN_ROWS on AMD with our
    vector kernels (measured on Zen 4, and Zen 4 capped at AVX2, which stands in for Zen 3; Zen 2
    not measured), else DECODE_GEMM_MIN_ROWS (scalar kernels, other CPUs)."""
    amd = cpu_vendor() == "AuthenticAMD" and _C.active_isa() in ("avx2", "avx512")
    return AMD_DECODE_GEMM_MIN_ROWS if amd else DECODE_GEMM_MIN_ROWS


def _fits(x2: torch.Tensor, backend: str, weight_values: int, min_rows: Callable[[], int]) -> bool:
    # Traced (torch.compile, export): the op, whose fake implementation covers every batch; a
    # branch on the batch here split a dynamic batch at 64 rows, and the fork check is a pybind
    # call dynamo cannot trace (fullgraph=True failed from 64 rows). The row checks come before
    # the pybind calls: batch-1 calls stop at the first (every threshold is >= 64 rows).
    if torch.compiler.is_compiling():
        return False
    return (backend == "auto" and x2.device.type == "cpu" and x2.dtype == torch.float32
            and weight_values <= SMALL_WEIGHT and x2.shape[0] >= DECODE_GEMM_MIN_ROWS
            and x2.shape[0] >= min_rows() and not _C.in_forked_child())


def applies(x2: torch.Tensor, backend: str, weight_values: int) -> bool:
    """Whether a weight-only layer of this many values decodes and runs torch's GEMM for x2."""
    return _fits(x2, backend, weight_values, decode_min_rows)


# Sparse layers (ops/sparse.py) decode too where their kernels, which skip the zeros but run
# well below a GEMM's multiply-adds per cycle, lose to torch's GEMM on the whole weight: with
# about half the weights kept or more, at a thousand rows and more. Measured on a 2-core Zen 4
# (sparse kernel / fp32 decode + torch's GEMM; MiniLM's 1536 x 384, 384 x 1536, 384 x 384):
# 2:4 at 512 rows 0.72 / 0.94 / 0.75, 1024 rows 0.84 / 1.02 / 0.94, 1792 rows 0.90 / 1.07 /
# 1.06; 50% unstructured 0.81 / 1.02 / 0.84, 0.91 / 1.08 / 1.02, 0.93 / 1.13 / 1.13; 3:4 (75%
# kept) 0.99 / 1.20 / 0.93 at 512 rows, 1.20 / 1.39 / 1.32 at 1792. Below half kept the
# kernels stay ahead (90% zeros ~0.6 at 1792 rows).
# On Intel, whose MKL sgemm is Intel's own, the route wins sooner (2-core Xeon with AMX,
# AVX-512, thirty-seventh session; MiniLM's three shapes, x dense fp32, kernel / route): 2:4 at
# 384 rows 0.67-0.79 / 0.61-0.81, at 512 0.63-0.75 / 0.65-0.83; 50% CSR at 384 rows 0.64-0.73 /
# 0.68-0.87; 3:4 at 256 rows 0.56-0.61 / 0.52-0.72, at 384 0.52-0.57 / 0.60-0.76.
SPARSE_MIN_DENSITY = 0.45
SPARSE_MIN_ROWS = 1024
SPARSE_DENSE_MIN_DENSITY = 0.7  # from here, SPARSE_DENSE_MIN_ROWS
SPARSE_DENSE_MIN_ROWS = 512
INTEL_SPARSE_MIN_ROWS = 512
INTEL_SPARSE_DENSE_MIN_ROWS = 384


def sparse_min_rows(density: float) -> int:
    """Rows from which a sparse layer keeping this fraction of its weights decodes (on Intel
    CPUs sooner than elsewhere, see above)."""
    intel = cpu_vendor() == "GenuineIntel"
    if density >= SPARSE_DENSE_MIN_DENSITY:
        return INTEL_SPARSE_DENSE_MIN_ROWS if intel else SPARSE_DENSE_MIN_ROWS
    return INTEL_SPARSE_MIN_ROWS if intel else SPARSE_MIN_ROWS


def sparse_applies(x2: torch.Tensor, backend: str, weight_values: int, density: float) -> bool:
    """Whether a sparse layer of this many dense values, with this fraction kept, decodes and
    runs torch's GEMM for x2 (see SPARSE_MIN_DENSITY)."""
    return density >= SPARSE_MIN_DENSITY and _fits(x2, backend, weight_values, lambda: sparse_min_rows(density))


# Sparse convolutions (ops/sparse_conv.py) decode from the same density: their kernels run on
# the linears' transposed tiles, and oneDNN's dense conv does ~2.5x their multiply-adds per
# cycle. ResNet-shaped layers at batch 1 / 8, 2:4 and 50% (2-core Zen 5, AVX-512, x dense fp32,
# sparse kernel / decode + F.conv2d): 128 -> 128 3x3 28^2 0.57-0.71 / 0.84-0.99, 256 -> 256 14^2
# 0.49-0.59 / 0.67-0.95, 1x1 256 -> 64 56^2 0.57-0.86 / 0.86-1.05, stride 2 0.58-0.66 /
# 0.85-1.01; 64 -> 64 56^2 lost a little at batch 8 (1.14-1.18 / 1.00-1.03). 75% zeros stays on
# the kernels (0.72-1.63 against 0.89-1.00). Up to SMALL_WEIGHT values: decoding 512 x 4608
# took 0.9-1.7 ms, more than the conv.
SPARSE_CONV_MIN_POSITIONS = 64


def sparse_conv_applies(x: torch.Tensor, backend: str, weight_values: int, density: float, positions: int) -> bool:
    """Whether a sparse conv of this many dense weight values, with this fraction kept, decodes
    and runs torch's F.conv2d for x (B * Ho * Wo = positions)."""
    if torch.compiler.is_compiling() or density < SPARSE_MIN_DENSITY:
        return False
    return (backend == "auto" and x.device.type == "cpu" and x.dtype == torch.float32 and weight_values <= SMALL_WEIGHT
            and positions >= SPARSE_CONV_MIN_POSITIONS and not _C.in_forked_child())


def linear(x2: torch.Tensor, decode: Callable[[], torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 [M, K] @ W.T + bias, W given by decode() as fp32 [N, K]."""
    return F.linear(x2, decode(), None if bias is None else bias.float())
