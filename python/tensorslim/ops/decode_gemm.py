"""Weight-only and sparse linears at large batches on the CPU: decode a small weight once with
our kernel, then multiply with torch's own fp32 GEMM, the one the uncompressed model runs, on
torch's threads (sparse layers: see SPARSE_MIN_DENSITY).

With M rows the product costs M x K x N multiply-adds against K x N decodes, and a decoded
weight of up to SMALL_WEIGHT values (4 MiB; MiniLM's layers) stays in cache, so from
DECODE_GEMM_MIN_ROWS rows the GEMM sets the speed: MiniLM at batch 32 ran at 0.61-0.64x fp32
on our panel GEMM and on oneDNN's weight-decompression matmul (Sapphire Rapids, AVX-512), at
~0.9x this way. Larger weights stay on the C++ dispatch (our panel GEMM, decoding one K block
at a time; on AVX-512 oneDNN from 1024 rows): decoding 4096 x 4096 whole for 32 rows wrote and
re-read 64 MiB, 26 ms against 9 ms for fp32.
Below 64 rows the C++ panel GEMM was faster (its rows-dot kernel, src/cpu/panel_gemm_tiles.h,
where the activations are small): at 32-48 rows of MiniLM's 384 x 1536 and 1536 x 384 INT4,
0.85-1.03x fp32 against 0.62-0.73x this way.

fp32 activations only: a bf16 GEMM would need a bf16 weight, rounding the decoded values.
Not in a fork() child: torch's GEMM runs on GNU OpenMP, whose parent team is not there
(an fp32 nn.Linear hangs in such a child too); our kernels start their own threads.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._native import _C

DECODE_GEMM_MIN_ROWS = 64
SMALL_WEIGHT = 1 << 20  # values; the C++ dispatch (src/cpu/panel_gemm.h kPanelSmallWeight) uses the same


def applies(x2: torch.Tensor, backend: str, weight_values: int) -> bool:
    # Traced (torch.compile, export): the op, whose fake implementation covers every batch; a
    # branch on the batch here split a dynamic batch at 64 rows, and the fork check is a pybind
    # call dynamo cannot trace (fullgraph=True failed from 64 rows).
    if torch.compiler.is_compiling():
        return False
    return (backend == "auto" and x2.device.type == "cpu" and x2.dtype == torch.float32
            and x2.shape[0] >= DECODE_GEMM_MIN_ROWS and weight_values <= SMALL_WEIGHT
            and not _C.in_forked_child())


# Sparse layers (ops/sparse.py) decode too where their kernels, which skip the zeros but run
# well below a GEMM's multiply-adds per cycle, lose to torch's GEMM on the whole weight: with
# about half the weights kept or more, at a thousand rows and more. Measured on a 2-core Zen 4
# (sparse kernel / fp32 decode + torch's GEMM; MiniLM's 1536 x 384, 384 x 1536, 384 x 384):
# 2:4 at 512 rows 0.72 / 0.94 / 0.75, 1024 rows 0.84 / 1.02 / 0.94, 1792 rows 0.90 / 1.07 /
# 1.06; 50% unstructured 0.81 / 1.02 / 0.84, 0.91 / 1.08 / 1.02, 0.93 / 1.13 / 1.13; 3:4 (75%
# kept) 0.99 / 1.20 / 0.93 at 512 rows, 1.20 / 1.39 / 1.32 at 1792. Below half kept the
# kernels stay ahead (90% zeros ~0.6 at 1792 rows).
SPARSE_MIN_DENSITY = 0.45
SPARSE_MIN_ROWS = 1024
SPARSE_DENSE_MIN_DENSITY = 0.7  # from here, SPARSE_DENSE_MIN_ROWS
SPARSE_DENSE_MIN_ROWS = 512


def sparse_applies(x2: torch.Tensor, backend: str, weight_values: int, density: float) -> bool:
    """Whether a sparse layer of this many dense values, with this fraction kept, decodes and
    runs torch's GEMM for x2 (see SPARSE_MIN_DENSITY)."""
    rows = SPARSE_DENSE_MIN_ROWS if density >= SPARSE_DENSE_MIN_DENSITY else SPARSE_MIN_ROWS
    return density >= SPARSE_MIN_DENSITY and x2.shape[0] >= rows and applies(x2, backend, weight_values)


def linear(x2: torch.Tensor, decode: Callable[[], torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 [M, K] @ W.T + bias, W given by decode() as fp32 [N, K]."""
    return F.linear(x2, decode(), None if bias is None else bias.float())
