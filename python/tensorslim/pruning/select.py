"""How many weights each layer loses, and the global threshold, by radix selection.

Global scope ranks every selected layer's scores s = |w|^p together. Non-negative floats
order like their bit patterns, so the threshold is found bit field by bit field
(10 + 11 + 10 bits, sign bit always 0): each pass histograms, per layer, the next field
of the scores whose higher bits match the prefix found so far. The scores are computed on
the fly by the C++ core, chunk by chunk (CHUNK elements at a time), from the weights
themselves: nothing like a second fp32 copy of all scores is ever held. Memory bound:
per-layer histograms (layers x 2048 x 8 bytes) plus one converted chunk (CHUNK x 4 bytes)
for weights that are not fp32 already (fp32 weights are read in place).

Per-layer floors / ceilings (lo_l <= k_l <= hi_l) are exact too: the passes find the
largest threshold t with f(t) = sum_l clamp(#{s_l < t}, lo_l, hi_l) < K, then the
remaining K - f(t) weights are taken from the ties s == t in layer order. Without bounds
f(t) = #{s < t}, so t is exactly the K-th smallest score.
"""
from typing import List, Sequence, Tuple

import torch

from ..ops import prune as prune_ops

PASSES = ((21, 10), (10, 11), (0, 10))  # (shift, bits) of each field, high to low
CHUNK = 1 << 24


def _chunks(w: torch.Tensor):
    flat = w.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK]


def _histogram(w: torch.Tensor, p: int, shift: int, nbits: int, prefix: int) -> torch.Tensor:
    h = torch.zeros(1 << nbits, dtype=torch.int64)
    for chunk in _chunks(w):
        h += prune_ops.score_histogram(chunk, shift, nbits, prefix, p)
    return h


def global_counts(weights: Sequence[torch.Tensor], p: int, total: int, lo: Sequence[int],
                  hi: Sequence[int]) -> Tuple[List[int], float, List[bool]]:
    """(k_l, threshold t, at_threshold_l): prune k_l of layer l, sum k_l = total. Where
    at_threshold_l is True, layer l's k_l smallest are exactly its scores < t plus some ties
    (a mask at t prunes them); otherwise a floor or ceiling moved it off t."""
    L = len(weights)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.int64), torch.tensor(hi, dtype=torch.int64)
    if not int(lo_t.sum()) <= total <= int(hi_t.sum()):
        raise ValueError(f"the per-layer floors / ceilings allow {int(lo_t.sum())}..{int(hi_t.sum())} "
                         f"pruned weights, not {total}")
    if total == int(lo_t.sum()):  # every layer exactly at its floor (total 0 included)
        return [int(v) for v in lo_t], 0.0, [False] * L
    below = torch.zeros(L, dtype=torch.int64)  # scores with bits below the current range
    prefix = 0
    hist = None
    for shift, nbits in PASSES:
        hist = torch.stack([_histogram(w, p, shift, nbits, prefix) for w in weights])  # [L, B]
        # cum[l, b]: layer l's scores below the start of bin b.
        cum = below[:, None] + torch.cumsum(hist, 1) - hist
        f = torch.minimum(torch.maximum(cum, lo_t[:, None]), hi_t[:, None]).sum(0)
        b = int((f < total).nonzero().max())  # f[0] < total holds by construction
        below = cum[:, b]
        prefix = (prefix << nbits) | b
        hist = hist[:, b]
    t = torch.tensor([prefix], dtype=torch.int32).view(torch.float32).item()
    base = torch.minimum(torch.maximum(below, lo_t), hi_t)
    with_ties = torch.minimum(torch.maximum(below + hist, lo_t), hi_t)
    extra = with_ties - base
    deficit = total - int(base.sum())
    counts, on_t = [], []
    for l in range(L):
        take = min(deficit, int(extra[l]))
        deficit -= take
        k = int(base[l]) + take
        counts.append(k)
        on_t.append(int(below[l]) <= k <= int(below[l] + hist[l]))
    assert deficit == 0, "radix selection lost count"  # f(t+) >= K guarantees enough ties
    return counts, t, on_t
