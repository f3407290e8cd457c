"""Activation observers: streaming statistics -> quantization ranges.

    obs = Observer("kl", granularity="tensor")
    for x in activations: obs.update(x)          # memory does not grow with the batches
    scale, zero_point = obs.qparams(symmetric=False)

methods      max         running min / max (exact)
             percentile  clip at the p-th percentile of |x| (symmetric) or of each tail
             mse         clip minimizing the expected squared quantization error
             kl          clip minimizing KL(P || Q) between the histogram and its quantized
                         version (entropy calibration, Migacz 2017)
granularity  tensor      one range
             channel     one range per feature (last dimension)
             token       one range per row, computed from the rows themselves at run time
                         (dynamic quantization); update() keeps only summary statistics

percentile / mse / kl read a histogram of `bins` bins per range over [-edge, edge]. When a
batch exceeds the edge, the edge doubles (as often as needed) and neighbouring bins merge,
so the state stays `bins` numbers per range however many batches are observed.
"""
from typing import Optional, Tuple

import torch

METHODS = ("max", "percentile", "mse", "kl")
GRANULARITIES = ("tensor", "channel", "token")


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, bits: int = 8):
    """(scale, zero_point) of a range: symmetric int codes (zero point 0, max |x| / (2^(b-1)-1))
    or asymmetric unsigned codes (range widened to include 0). Empty ranges get scale 1."""
    lo = torch.minimum(lo.double(), torch.zeros(()))
    hi = torch.maximum(hi.double(), torch.zeros(()))
    if symmetric:
        scale = torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale.float(), torch.zeros_like(scale, dtype=torch.int32)
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return scale.float(), zp


class Observer:
    """Streaming range statistics of activations; see the module docstring."""

    def __init__(self, method: str = "max", granularity: str = "tensor", bins: Optional[int] = None,
                 percentile: float = 99.99, symmetric: bool = False, bits: int = 8):
        if method not in METHODS:
            raise ValueError(f"Observer: method must be one of {METHODS}, got {method!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"Observer: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "token" and method in ("mse", "kl"):
            raise ValueError(f"Observer: per-token ranges are computed from each row at run time; "
                             f"method {method!r} needs a histogram over many values (use max or percentile)")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"Observer: percentile must be in (0, 100], got {percentile}")
        bins = bins if bins is not None else (2048 if granularity == "tensor" else 256)
        if bins < 16 or bins & (bins - 1):
            raise ValueError(f"Observer: bins must be a power of two >= 16, got {bins}")
        self.method, self.granularity, self.bins = method, granularity, bins
        self.percentile, self.symmetric, self.bits = percentile, symmetric, bits
        self.min: Optional[torch.Tensor] = None  # running min / max per range
        self.max: Optional[torch.Tensor] = None
        self.hist: Optional[torch.Tensor] = None  # [ranges, bins] float64 counts
        self.edge: Optional[torch.Tensor] = None  # [ranges]: histogram covers [-edge, edge]
        self.count = 0  # values (tensor/channel) or rows (token) observed

    # ------------------------------------------------------------ streaming updates

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[ranges, values] view of a batch for this granularity."""
        x = x.detach().float()
        if x.dim() == 0:
            x = x.reshape(1)
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        return x.reshape(-1, x.shape[-1]).T  # channel: one row per feature

    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Observer.update: expected a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"Observer.update: expected a float tensor, got {x.dtype}")
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("Observer.update: activations contain NaN or Inf")
        if self.granularity == "token":
            rows = x.detach().float().reshape(-1, x.shape[-1])
            amax = rows.abs().amax(dim=1)
            self.min = amax.min() if self.min is None else torch.minimum(self.min, amax.min())
            self.max = amax.max() if self.max is None else torch.maximum(self.max, amax.max())
            self.count += rows.shape[0]
            return
        r = self._rows(x)
        if self.max is not None and r.shape[0] != self.max.shape[0]:
            raise ValueError(f"Observer.update: expected {self.max.shape[0]} channels, got {r.shape[0]}")
        lo, hi = r.amin(dim=1), r.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += r.shape[1]
        if self.method != "max":
            self._update_hist(r)

    def _update_hist(self, r: torch.Tensor) -> None:
        B = self.bins
        amax = r.abs().amax(dim=1).double()
        if self.hist is None:
            self.edge = torch.where(amax > 0, amax, torch.ones_like(amax))
            self.hist = torch.zeros(r.shape[0], B, dtype=torch.float64)
        grow = torch.ceil(torch.log2(amax / self.edge)).clamp(min=0, max=40).to(torch.int64)
        if bool((grow > 0).any()):
            # Doubling the edge k times: bin i (offset i - B/2 from the centre) lands in
            # bin B/2 + floor((i - B/2) / 2^k); the counts merge exactly.
            offs = torch.arange(B, dtype=torch.int64) - B // 2
            new_idx = B // 2 + torch.div(offs[None, :], (2 ** grow)[:, None], rounding_mode="floor")
            merged = torch.zeros_like(self.hist)
            merged.scatter_add_(1, new_idx, self.hist)
            self.hist = merged
            self.edge = self.edge * (2.0 ** grow).double()
        width = 2 * self.edge / B
        idx = torch.floor((r.double() + self.edge[:, None]) / width[:, None]).clamp(0, B - 1).to(torch.int64)
        flat = (idx + torch.arange(r.shape[0])[:, None] * B).reshape(-1)
        self.hist += torch.bincount(flat, minlength=r.shape[0] * B).reshape(r.shape[0], B).double()

    # ------------------------------------------------------------ results

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) clipping range per range (0-d for tensor granularity)."""
        if self.granularity == "token":
            raise ValueError("Observer.range: per-token ranges come from each row (see token_qparams)")
        if self.max is None:
            raise ValueError("Observer.range: no data observed (did the calibration reach this layer?)")
        lo, hi = self.min.double(), self.max.double()
        if self.method == "percentile":
            lo, hi = self._percentile_range()
        elif self.method == "mse":
            lo, hi = self._search_range(self._mse_cost)
        elif self.method == "kl":
            lo, hi = self._kl_range()
        if self.granularity == "tensor":
            lo, hi = lo.reshape(()), hi.reshape(())
        return lo.float(), hi.float()

    def qparams(self, symmetric: Optional[bool] = None):
        """(scale, zero_point) from the observed range: floats/ints per tensor, tensors per channel."""
        sym = self.symmetric if symmetric is None else symmetric
        lo, hi = self.range()
        scale, zp = qparams_from_range(lo, hi, sym, self.bits)
        if self.granularity == "tensor":
            return float(scale), int(zp)
        return scale, zp

    def token_qparams(self, x: torch.Tensor, symmetric: Optional[bool] = None):
        """Per-row (scale [rows], zero_point [rows]) of x with this observer's method."""
        sym = self.symmetric if symmetric is None else symmetric
        rows = x.detach().float().reshape(-1, x.shape[-1])
        if self.method == "max":
            lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        else:
            q = self.percentile / 100.0
            if sym:
                hi = torch.quantile(rows.abs(), q, dim=1)
                lo = -hi
            else:
                lo, hi = torch.quantile(rows, 1 - q, dim=1), torch.quantile(rows, q, dim=1)
        return qparams_from_range(lo, hi, sym, self.bits)

    # ------------------------------------------------------------ histogram helpers

    def _centers(self) -> torch.Tensor:
        B = self.bins
        width = 2 * self.edge / B
        return -self.edge[:, None] + (torch.arange(B, dtype=torch.float64)[None, :] + 0.5) * width[:, None]

    def _abs_hist(self) -> torch.Tensor:
        """[ranges, bins/2] counts of |x|; abs bin j covers [j, j+1) * width."""
        half = self.bins // 2
        return self.hist[:, half:] + self.hist[:, :half].flip(1)

    def _percentile_range(self):
        width = (2 * self.edge / self.bins)[:, None]
        q = self.percentile / 100.0
        lo_obs, hi_obs = self.min.double(), self.max.double()
        if self.symmetric:
            h = self._abs_hist()
            cdf = h.cumsum(1) / h.sum(1, keepdim=True).clamp(min=1)
            j = (cdf < q).sum(1, keepdim=True).clamp(max=h.shape[1] - 1)
            t = ((j + 1) * width).squeeze(1)
            t = torch.minimum(t, torch.maximum(-lo_obs, hi_obs))
            return -t, t
        cdf = self.hist.cumsum(1) / self.hist.sum(1, keepdim=True).clamp(min=1)
        i_hi = (cdf < q).sum(1, keepdim=True).clamp(max=self.bins - 1)
        i_lo = (cdf < 1 - q).sum(1, keepdim=True).clamp(max=self.bins - 1)
        edge = self.edge[:, None]
        hi = (-edge + (i_hi + 1) * width).squeeze(1)
        lo = (-edge + i_lo * width).squeeze(1)
        return torch.maximum(lo, lo_obs), torch.minimum(hi, hi_obs)

    def _mse_cost(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Expected squared error of quantizing the histogram (bin centres) with [lo, hi];
        lo, hi: [candidates, ranges] -> [candidates, ranges]."""
        scale, zp = qparams_from_range(lo, hi, self.symmetric, self.bits)
        scale, zp = scale.double()[..., None], zp.double()[..., None]
        qmin, qmax = (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if self.symmetric else (0, 2 ** self.bits - 1)
        c = self._centers()[None]
        deq = ((torch.round(c / scale) + zp).clamp(qmin, qmax) - zp) * scale
        return (self.hist[None] * (c - deq) ** 2).sum(-1)

    def _search_range(self, cost, n: int = 64):
        """The shrunk range with the lowest cost: f * max|x| (symmetric), or the two ends
        shrunk one at a time, twice over (asymmetric), with f in (0, 1]."""
        f = torch.linspace(1.0 / n, 1.0, n, dtype=torch.float64)[:, None]
        r = torch.arange(self.max.shape[0])
        lo0, hi0 = self.min.double()[None], self.max.double()[None]
        if self.symmetric:
            t = torch.maximum(-lo0, hi0) * f
            best = cost(-t, t).argmin(0)
            return -t[best, r], t[best, r]
        lo, hi = lo0[0], hi0[0]
        for _ in range(2):
            cand = hi0 * f
            hi = cand[cost(lo[None].expand_as(cand), cand).argmin(0), r]
            cand = lo0 * f
            lo = cand[cost(cand, hi[None].expand_as(cand)).argmin(0), r]
        return lo, hi

    def _kl_range(self):
        """Entropy calibration on the |x| histogram: the threshold (in abs bins) whose clipped
        distribution P and its 128-level quantization Q have the smallest KL(P || Q)."""
        h = self._abs_hist()
        R, A = h.shape
        levels = 2 ** (self.bits - 1)
        width = 2 * self.edge / self.bins
        amax = torch.maximum(-self.min.double(), self.max.double())
        if A <= levels:
            t = amax
        else:
            step = max(1, (A - levels) // 64)
            cands = list(range(levels, A + 1, step))
            if cands[-1] != A:
                cands.append(A)
            kls = torch.empty(len(cands), R, dtype=torch.float64)
            for ci, i in enumerate(cands):
                p = h[:, :i].clone()
                p[:, -1] += h[:, i:].sum(1)
                chunk = torch.div(torch.arange(i) * levels, i, rounding_mode="floor").expand(R, i)
                nz = (h[:, :i] > 0).double()
                tot = torch.zeros(R, levels, dtype=torch.float64).scatter_add_(1, chunk, h[:, :i])
                cnt = torch.zeros(R, levels, dtype=torch.float64).scatter_add_(1, chunk, nz)
                q = torch.gather(tot / cnt.clamp(min=1), 1, chunk) * nz
                p = p / p.sum(1, keepdim=True).clamp(min=1e-300)
                q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
                mask = p > 0
                # Bins with P > 0 but Q = 0 (only the outlier bin) get a tiny Q, as is usual.
                ratio = torch.where(mask, p / torch.where(q > 0, q, torch.full_like(q, 1e-12)), torch.ones_like(p))
                kls[ci] = (p * torch.log(ratio)).sum(1)
            best = kls.argmin(0)
            t = torch.tensor(cands, dtype=torch.float64)[best] * width
            t = torch.minimum(t, amax)
        if self.symmetric:
            return -t, t
        return torch.maximum(self.min.double(), -t), torch.minimum(self.max.double(), t)

    def state_bytes(self) -> int:
        """Memory held by the running statistics (constant in the number of batches)."""
        return sum(t.numel() * t.element_size() for t in (self.min, self.max, self.hist, self.edge)
                   if t is not None)


def make_observer(method: str, granularity: str = "tensor", **kw) -> Observer:
    return Observer(method, granularity, **kw)


__all__ = ["Observer", "METHODS", "GRANULARITIES", "qparams_from_range", "make_observer"]
