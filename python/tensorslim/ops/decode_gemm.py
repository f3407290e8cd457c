"""Weight-only linears at large batches on the CPU: decode the weight once with our kernel, then
multiply with torch's own fp32 GEMM, the one the uncompressed model runs, on torch's threads.

With M rows the product costs M x K x N multiply-adds against K x N decodes, so from a few
dozen rows the GEMM sets the speed, and no GEMM of ours beats torch's (MKL): our panel GEMM
and oneDNN's weight-decompression matmul ran MiniLM at batch 32 at 0.61-0.64x fp32 on
Sapphire Rapids (AVX-512), decode + torch's GEMM at ~0.9x (docs/benchmarks.md). Below the
threshold the fused kernels, which never hold a decoded weight, are the faster.

fp32 activations only: a bf16 GEMM would need a bf16 weight, rounding the decoded values.
Not in a fork() child: torch's GEMM runs on GNU OpenMP, whose parent team is not there
(an fp32 nn.Linear hangs in such a child too); our kernels start their own threads.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._native import _C

DECODE_GEMM_MIN_ROWS = 32
_TILE_VALUES = 16 << 20  # weight values decoded at a time (64 MiB in fp32): bounds the temporary


def applies(x2: torch.Tensor, backend: str) -> bool:
    return (backend == "auto" and x2.device.type == "cpu" and x2.dtype == torch.float32
            and x2.shape[0] >= DECODE_GEMM_MIN_ROWS and not _C.in_forked_child())


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
