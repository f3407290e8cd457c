"""Which weights a sparsity config keeps: keep-masks from scores (nothing is applied here).

Ties are broken the same way everywhere: among equal scores the lower column is kept first
(n:m, per row), or pruned first (per layer; see pruning.unstructured)."""
import torch


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool [N, K]: the n largest scores of every m consecutive columns; the last partial
    group of r < m columns keeps min(n, r)."""
    rows, cols = score.shape
    groups = -(-cols // m)
    pad = groups * m - cols
    s = torch.nn.functional.pad(score.double(), (0, pad), value=float("-inf")).reshape(rows, groups, m)
    order = torch.argsort(-s, dim=2, stable=True)  # descending; ties keep the lower column
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(2, order[..., :n], True)
    return keep.reshape(rows, groups * m)[:, :cols].contiguous()


def row_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """bool [N, K]: every row prunes its round(sparsity * K) smallest scores (Wanda's
    per-output comparison group); ties prune the lower column first."""
    rows, cols = score.shape
    k = round(sparsity * cols)
    order = torch.argsort(score.double(), dim=1, stable=True)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def fits_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m columns of w holds at most n nonzeros."""
    rows, cols = w.shape
    groups = -(-cols // m)
    nz = torch.nn.functional.pad((w != 0).to(torch.int32), (0, groups * m - cols)).reshape(rows, groups, m)
    return bool((nz.sum(2) <= n).all())
