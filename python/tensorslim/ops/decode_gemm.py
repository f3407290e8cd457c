"""Weight-only linears at large batches on the CPU: decode the weight once with our kernel, then
multiply with torch's own fp32 GEMM, the one the uncompressed model runs, on torch's threads.

With M rows the product costs M x K x N multiply-adds against K x N decodes. Where the decoded
weight stays in cache (up to SMALL_WEIGHT values, MiniLM's layers) that pays from
DECODE_GEMM_MIN_ROWS rows: our panel GEMM and oneDNN's weight-decompression matmul ran MiniLM
at batch 32 at 0.61-0.64x fp32 on Sapphire Rapids (AVX-512), decode + torch's GEMM at ~0.9x.
Larger weights are decoded in cache-sized row tiles, and only from LARGE_WEIGHT_MIN_ROWS rows:
below that, writing and re-reading the decoded tiles costs more than our panel GEMM loses
(4096 x 4096, 32 rows: 26 ms decoding it whole, against 10 ms for the panel GEMM and 9 ms for
fp32). Below the thresholds the fused kernels, which never hold a decoded weight, run.

fp32 activations only: a bf16 GEMM would need a bf16 weight, rounding the decoded values.
Not in a fork() child: torch's GEMM runs on GNU OpenMP, whose parent team is not there
(an fp32 nn.Linear hangs in such a child too); our kernels start their own threads.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._native import _C

DECODE_GEMM_MIN_ROWS = 32
SMALL_WEIGHT = 1 << 20  # values (4 MiB decoded)
LARGE_WEIGHT_MIN_ROWS = 256
_TILE_VALUES = 1 << 20  # weight values decoded at a time: 4 MiB of fp32, in cache for the GEMM


def applies(x2: torch.Tensor, backend: str, weight_values: int) -> bool:
    rows = DECODE_GEMM_MIN_ROWS if weight_values <= SMALL_WEIGHT else LARGE_WEIGHT_MIN_ROWS
    return (backend == "auto" and x2.device.type == "cpu" and x2.dtype == torch.float32
            and x2.shape[0] >= rows and not _C.in_forked_child())


def linear(x2: torch.Tensor, decode: Callable[[int, int], torch.Tensor], rows: int,
           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 [M, K] @ W.T + bias, W's rows n0..n1 given by decode(n0, n1) as fp32 [n1 - n0, K];
    in row tiles where the whole weight would be a large temporary."""
    step = max(1, _TILE_VALUES // max(x2.shape[1], 1))
    b = None if bias is None else bias.float()
    if rows <= step:
        return F.linear(x2, decode(0, rows), b)
    return torch.cat([F.linear(x2, decode(n0, min(rows, n0 + step)), None if b is None else b[n0:n0 + step])
                      for n0 in range(0, rows, step)], dim=1)
