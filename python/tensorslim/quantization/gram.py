"""sum x^T x over calibration tokens, fast: the Hessians of GPTQ / SparseGPT and AWQ's Gram
matrices.

Each product covers at most CHUNK tokens and is computed in float32 (a GEMM at twice
float64's speed, with no float64 copy of the activations), then added into a float64 sum,
so rounding grows with CHUNK, not with the number of calibration tokens: relative to
sum |x_i x_j| the error stays near CHUNK * 2^-24 at worst, far below the damping (1% of
mean(diag H)) and below the float32 rounding the solvers' inputs get anyway
(tests/python/test_gram.py checks ill-conditioned data against float64). The matrix is
symmetric, so only its upper triangle of column blocks is computed (a blocked syrk) and
`symmetric` mirrors it once at the end.
"""
from typing import List, Tuple

import torch

CHUNK = 1024   # tokens per float32 product
BLOCK = 256    # column block of the triangle (smaller blocks lose GEMM efficiency)


def _blocks(k: int) -> List[Tuple[int, int]]:
    n = -(-k // BLOCK)
    size = -(-k // n)
    return [(a, min(a + size, k)) for a in range(0, k, size)]


def gram_upper(x: torch.Tensor) -> torch.Tensor:
    """float64 [K, K]: the upper triangle of column blocks of x^T x (x [n, K]); the blocks
    below the diagonal are zero (see symmetric)."""
    x = x.detach().float()
    k = x.shape[1]
    out = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    add_gram_upper_(out, x)
    return out


def add_gram_upper_(out: torch.Tensor, x: torch.Tensor) -> None:
    """out (float64 [K, K]) += the upper block triangle of x^T x, x [n, K] (float32)."""
    blocks = _blocks(x.shape[1])
    for r0 in range(0, x.shape[0], CHUNK):
        xc = x[r0:r0 + CHUNK]
        for i, (a0, a1) in enumerate(blocks):
            xa = xc[:, a0:a1].T
            for b0, b1 in blocks[i:]:
                out[a0:a1, b0:b1] += xa @ xc[:, b0:b1]


def symmetric(h: torch.Tensor) -> torch.Tensor:
    """The full matrix from its upper block triangle (in place; diagonal blocks are already
    full and symmetric up to rounding, so they are made exactly symmetric too)."""
    upper = torch.triu(h)
    h.copy_(upper + torch.triu(upper, 1).T)
    return h
