"""Rank selection for a truncated SVD: from a retained-energy fraction, a parameter ratio, or
one global parameter budget shared out across layers by their singular spectra."""
import heapq
from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class Spectrum:
    """What rank selection needs of one layer: its shape and singular values (possibly only the
    leading ones) and its total energy sum(sigma^2) = ||A||_F^2."""

    rows: int
    cols: int
    s: torch.Tensor  # float64, descending
    total: float

    @property
    def dense_params(self) -> int:
        return self.rows * self.cols

    @property
    def per_rank(self) -> int:
        return self.rows + self.cols

    @property
    def max_saving_rank(self) -> int:
        """The largest rank whose two factors hold fewer parameters than the dense weight."""
        return (self.dense_params - 1) // self.per_rank

    def kept_energy(self, rank: int) -> float:
        if self.total <= 0:
            return 1.0
        return min(1.0, float((self.s[:rank] ** 2).sum()) / self.total)


def rank_for_energy(sp: Spectrum, energy: float) -> int:
    """The smallest rank keeping `energy` of sum(sigma^2)."""
    if sp.total <= 0:
        return 1
    cum = torch.cumsum(sp.s ** 2, 0) / sp.total
    hit = torch.nonzero(cum >= energy - 1e-12)
    return int(hit[0]) + 1 if len(hit) else len(sp.s)


def rank_for_ratio(rows: int, cols: int, ratio: float) -> int:
    """The largest rank (>= 1) whose factors hold at most `ratio` of rows * cols parameters."""
    # the budget rounded to whole parameters first: 0.7 * 48 * 80 is 2687.99999... in binary
    # floating point, which gave rank 20 where 21 factors hold exactly 2688
    return max(1, int(round(ratio * rows * cols, 6)) // (rows + cols))


def ranks_for_budget(spectra: Dict[str, Spectrum], budget: float) -> Dict[str, Optional[int]]:
    """Ranks (None = stays dense) so that all layers together hold at most `budget` of their
    dense parameters. Greedy: repeatedly take the step that loses the least relative energy per
    parameter saved, a step being one layer's next-smallest singular value, or, for a layer
    still dense, the jump to the largest rank that saves anything (dropping its whole tail).
    """
    total = sum(sp.dense_params for sp in spectra.values())
    target = budget * total
    rank: Dict[str, Optional[int]] = {name: None for name in spectra}
    params = float(total)

    def rel(sp: Spectrum, lo: int, hi: int) -> float:  # energy fraction of sigma[lo:hi]
        return float((sp.s[lo:hi] ** 2).sum()) / sp.total if sp.total > 0 else 0.0

    def next_step(name: str):
        sp, r = spectra[name], rank[name]
        if r is None:
            r0 = sp.max_saving_rank
            if r0 < 1:
                return None  # no rank saves parameters in this layer
            saved = sp.dense_params - r0 * sp.per_rank
            return rel(sp, r0, len(sp.s)) / saved, r0
        if r <= 1:
            return None
        return rel(sp, r - 1, r) / sp.per_rank, r - 1

    heap = []
    for name in spectra:
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, (step[0], name, step[1]))
    while params > target and heap:
        _, name, new_rank = heapq.heappop(heap)
        sp, old = spectra[name], rank[name]
        params -= (sp.dense_params if old is None else old * sp.per_rank) - new_rank * sp.per_rank
        rank[name] = new_rank
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, (step[0], name, step[1]))
    if params > target + 0.5:
        raise ValueError(f"SVD: budget {budget} is out of reach: even at rank 1 everywhere the "
                         f"selected layers keep {params / total:.4f} of their parameters")
    return rank
