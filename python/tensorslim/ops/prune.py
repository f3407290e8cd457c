"""Pruning cores as torch.library ops: scores |w|^p, the k-th smallest score (selection),
exact-k keep masks, radix-select histograms and row gathers. Each has a fake impl and a
plain-PyTorch reference (backend="reference") that follows the same specification:
exactly k entries pruned, every score below the threshold first, then ties in index order.
"""
import torch

from .. import _views
from .._native import _C

PRUNE_BACKENDS = ("auto", "reference")


def _f32(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(-1).to(torch.float32).contiguous()


def _check(p: int, backend: str, fn: str) -> None:
    if p not in (1, 2):
        raise ValueError(f"{fn}: norm p must be 1 or 2, got {p!r}")
    if backend not in PRUNE_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {PRUNE_BACKENDS}, got {backend!r}")


@torch.library.custom_op("tensorslim::prune_scores", mutates_args=(), device_types="cpu")
def _scores(w: torch.Tensor, p: int) -> torch.Tensor:
    out = torch.empty_like(w)
    _C.prune_scores(_views.view(w, "w"), p, _views.view(out, "scores"))
    return out


@_scores.register_fake
def _scores_fake(w, p):
    return torch.empty_like(w)


@torch.library.custom_op("tensorslim::kth_smallest", mutates_args=(), device_types="cpu")
def _kth(w: torch.Tensor, p: int, k: int) -> torch.Tensor:
    buf = _scores(w, p)  # one layer's scores, reordered in place by the selection
    return torch.tensor(_C.kth_smallest(_views.view(buf, "scores"), k), dtype=torch.float32)


@_kth.register_fake
def _kth_fake(w, p, k):
    return w.new_empty((), dtype=torch.float32)


@torch.library.custom_op("tensorslim::prune_mask", mutates_args=(), device_types="cpu")
def _mask(w: torch.Tensor, p: int, threshold: float, k: int) -> torch.Tensor:
    keep = torch.empty(w.shape, dtype=torch.uint8)
    _C.prune_mask(_views.view(w, "w"), p, threshold, k, _views.view(keep, "mask"))
    return keep


@_mask.register_fake
def _mask_fake(w, p, threshold, k):
    return torch.empty(w.shape, dtype=torch.uint8, device=w.device)


def _check_bit_field(shift, nbits, prefix) -> None:
    """The field (bits >> shift) & (2^nbits - 1) lies within a 32-bit score."""
    for name, v in (("shift", shift), ("nbits", nbits), ("prefix", prefix)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"score_histogram: {name} must be an int, got {v!r}")
    if not (1 <= nbits <= 16 and 0 <= shift <= 32 - nbits):
        raise ValueError(f"score_histogram: need 1 <= nbits <= 16 and 0 <= shift <= 32 - nbits, got shift {shift}, "
                         f"nbits {nbits}")


@torch.library.custom_op("tensorslim::score_histogram", mutates_args=(), device_types="cpu")
def _hist(w: torch.Tensor, p: int, shift: int, nbits: int, prefix: int) -> torch.Tensor:
    _check_bit_field(shift, nbits, prefix)  # before 2^nbits bins are allocated
    hist = torch.zeros(1 << nbits, dtype=torch.int32)
    _C.score_histogram(_views.view(w, "w"), p, shift, nbits, prefix, _views.view(hist, "hist"))
    return hist


@_hist.register_fake
def _hist_fake(w, p, shift, nbits, prefix):
    return w.new_empty(1 << nbits, dtype=torch.int32)


def scores(w: torch.Tensor, p: int = 1, backend: str = "auto") -> torch.Tensor:
    """|w|^p as a flat fp32 tensor."""
    _check(p, backend, "scores")
    w = _f32(w)
    if backend == "reference" or w.device.type != "cpu":
        return w.abs() if p == 1 else w * w
    return _scores(w, p)


def kth_smallest(w: torch.Tensor, k: int, p: int = 1, backend: str = "auto") -> float:
    """The k-th smallest (1-based) of |w|^p."""
    _check(p, backend, "kth_smallest")
    w = _f32(w)
    if not 1 <= k <= w.numel():
        raise ValueError(f"kth_smallest: k must be in [1, {w.numel()}], got {k}")
    if backend == "reference" or w.device.type != "cpu":
        return float(torch.kthvalue(scores(w, p, "reference").cpu(), k).values)
    return float(_kth(w, p, k))


def keep_mask(w: torch.Tensor, k: int, threshold: float, p: int = 1, backend: str = "auto") -> torch.Tensor:
    """A uint8 mask shaped like w, 0 on exactly k pruned entries: scores < threshold first,
    then scores == threshold in index order (threshold = the k-th smallest score)."""
    _check(p, backend, "keep_mask")
    flat = _f32(w)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"keep_mask: k must be in [0, {flat.numel()}], got {k}")
    if backend == "reference" or flat.device.type != "cpu":
        s = scores(flat, p, "reference")
        keep = s > threshold
        ties = (s == threshold).nonzero().flatten()
        quota = max(0, min(k - int((s < threshold).sum()), ties.numel()))
        keep[ties[quota:]] = True
        return keep.to(torch.uint8).reshape(w.shape)
    return _mask(flat, p, float(threshold), k).reshape(w.shape)


def score_histogram(w: torch.Tensor, shift: int, nbits: int, prefix: int, p: int = 1,
                    backend: str = "auto") -> torch.Tensor:
    """int32 [2^nbits]: counts of the score bit fields (bits >> shift) & (2^nbits - 1) among
    the scores whose higher bits (>> shift + nbits) equal prefix."""
    _check(p, backend, "score_histogram")
    _check_bit_field(shift, nbits, prefix)
    flat = _f32(w)
    if backend == "reference" or flat.device.type != "cpu":
        bits = scores(flat, p, "reference").view(torch.int32).to(torch.int64)
        top = shift + nbits
        sel = bits[(bits >> top) == prefix] if top < 32 else bits
        return torch.bincount((sel >> shift) & ((1 << nbits) - 1), minlength=1 << nbits).to(torch.int32)
    return _hist(flat, p, shift, nbits, prefix)


def gather_rows(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """w[index] for a 2-D fp32 CPU matrix (the rows of the channels a pruning keeps);
    other dtypes / devices use torch's index_select."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu":
        return w.index_select(0, index.to(w.device))
    src = w.detach().contiguous()
    idx = index.to(torch.int32).contiguous()
    out = torch.empty(idx.numel(), w.shape[1], dtype=torch.float32)
    _C.gather_rows(_views.view(src, "w"), _views.view(idx, "index"), _views.view(out, "out"))
    return out
