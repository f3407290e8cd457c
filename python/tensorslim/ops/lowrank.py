"""Low-rank factorization cores: SVD (exact, randomized), SVD-LLM whitening, Tucker-2, CP-ALS.

Each is a torch.library custom op running the C++ core (src/cpu/lowrank/), with a fake
implementation for meta tensors and a plain-PyTorch reference of the same algorithm in float64
(backend="reference") that the tests compare against. Inputs are fp32 on the CPU; the
factorizations are computed once per layer, off the inference path.
"""
from typing import NamedTuple, Tuple

import torch

from .. import _views
from .._native import _C

LOWRANK_BACKENDS = ("auto", "native", "reference")


def _check_backend(backend: str) -> None:
    if backend not in LOWRANK_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {LOWRANK_BACKENDS}")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _check_matrix(w: torch.Tensor, fn: str, ndim: int = 2) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{fn}: expected a tensor, got {type(w).__name__}")
    if w.dim() != ndim or w.numel() == 0:
        raise ValueError(f"{fn}: expected a non-empty {ndim}-D tensor, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{fn}: expected a float tensor, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{fn}: the tensor contains NaN or Inf")


class Svd(NamedTuple):
    u: torch.Tensor   # [m, k]
    s: torch.Tensor   # [k], descending
    vt: torch.Tensor  # [k, n]


# ---------------------------------------------------------------- SVD


@torch.library.custom_op("tensorslim::svd", mutates_args=(), device_types="cpu")
def _svd(w: torch.Tensor, double_precision: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vt = _svd_fake(w, double_precision)
    _C.svd_exact(_views.view(w, "w"), double_precision, _views.view(u, "u"), _views.view(s, "s"),
                 _views.view(vt, "vt"))
    return u, s, vt


@_svd.register_fake
def _svd_fake(w, double_precision):
    m, n = w.shape
    k = min(m, n)
    return w.new_empty(m, k), w.new_empty(k), w.new_empty(k, n)


def svd(w: torch.Tensor, double_precision: bool = False, backend: str = "auto") -> Svd:
    """Thin SVD w = u diag(s) vt (Eigen's divide-and-conquer SVD), fp32 factors."""
    _check_matrix(w, "svd")
    _check_backend(backend)
    if backend == "reference":
        u, s, vt = torch.linalg.svd(w.detach().double().cpu(), full_matrices=False)
        return Svd(u.float(), s.float(), vt.float())
    return Svd(*_svd(_f32(w), bool(double_precision)))


@torch.library.custom_op("tensorslim::svd_randomized", mutates_args=(), device_types="cpu")
def _rsvd(w: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vt = _rsvd_fake(w, rank, oversample, power_iters, seed)
    _C.svd_randomized(_views.view(w, "w"), oversample, power_iters, seed, _views.view(u, "u"),
                      _views.view(s, "s"), _views.view(vt, "vt"))
    return u, s, vt


@_rsvd.register_fake
def _rsvd_fake(w, rank, oversample, power_iters, seed):
    m, n = w.shape
    return w.new_empty(m, rank), w.new_empty(rank), w.new_empty(rank, n)


def svd_randomized(w: torch.Tensor, rank: int, oversample: int = 10, power_iters: int = 2,
                   seed: int = 0, backend: str = "auto") -> Svd:
    """The leading `rank` singular triplets by randomized SVD (Halko et al. 2011): a Gaussian
    sketch of rank + oversample columns, power iterations, exact SVD of the projection."""
    _check_matrix(w, "svd_randomized")
    _check_backend(backend)
    k_max = min(w.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k_max:
        raise ValueError(f"svd_randomized: rank must be an int in 1..min(m, n) = {k_max}, got {rank!r}")
    if oversample < 0 or power_iters < 0:
        raise ValueError("svd_randomized: oversample and power_iters must be >= 0")
    if backend == "reference":
        return svd_randomized_reference(w, rank, oversample, power_iters, seed)
    return Svd(*_rsvd(_f32(w), rank, int(oversample), int(power_iters), int(seed)))


def svd_randomized_reference(w, rank, oversample=10, power_iters=2, seed=0) -> Svd:
    """The same algorithm in float64 PyTorch (its own Gaussian draw, so equal up to the sketch)."""
    a = w.detach().double().cpu()
    m, n = a.shape
    width = min(rank + oversample, m, n)
    gen = torch.Generator().manual_seed(seed)
    y = torch.linalg.qr(a @ torch.randn(n, width, generator=gen, dtype=torch.float64)).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(a.T @ y).Q
        y = torch.linalg.qr(a @ z).Q
    ub, s, vt = torch.linalg.svd(y.T @ a, full_matrices=False)
    return Svd((y @ ub[:, :rank]).float(), s[:rank].float(), vt[:rank].float())


# ---------------------------------------------------------------- SVD-LLM whitening


@torch.library.custom_op("tensorslim::whiten", mutates_args=(), device_types="cpu")
def _whiten(w: torch.Tensor, g: torch.Tensor, damp: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wl, l, used = _whiten_fake(w, g, damp)
    used[0] = _C.whiten(_views.view(w, "w"), _views.view(g, "g"), damp, _views.view(wl, "wl"),
                        _views.view(l, "l"))
    return wl, l, used


@_whiten.register_fake
def _whiten_fake(w, g, damp):
    n = w.shape[1]
    return w.new_empty(w.shape), w.new_empty(n, n), w.new_empty(1, dtype=torch.float64)


class Whitened(NamedTuple):
    wl: torch.Tensor   # w @ l
    l: torch.Tensor    # lower Cholesky factor of g + damping
    damp_used: float


def whiten(w: torch.Tensor, g: torch.Tensor, damp: float = 0.01, backend: str = "auto") -> Whitened:
    """SVD-LLM's whitening of w [m, n] by the Cholesky factor l of g + damp * mean(diag g) * I,
    g = X^T X / N [n, n]; damp is raised x10 until the factorization succeeds."""
    _check_matrix(w, "whiten")
    _check_matrix(g, "whiten")
    if g.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"whiten: g must be [{w.shape[1]}, {w.shape[1]}], got {tuple(g.shape)}")
    if not damp >= 0:
        raise ValueError(f"whiten: damp must be >= 0, got {damp}")
    _check_backend(backend)
    if backend == "reference":
        return whiten_reference(w, g, damp)
    wl, l, used = _whiten(_f32(w), _f32(g), float(damp))
    return Whitened(wl, l, float(used[0]))


def whiten_reference(w, g, damp=0.01) -> Whitened:
    g = g.detach().double().cpu()
    n = g.shape[0]
    mean = float(g.diagonal().mean()) if float(g.diagonal().mean()) > 0 else 1.0
    frac = damp
    for _ in range(12):
        l, info = torch.linalg.cholesky_ex(g + frac * mean * torch.eye(n, dtype=torch.float64))
        if info == 0:
            return Whitened((w.detach().double().cpu() @ l).float(), l.float(), frac)
        frac = frac * 10 if frac > 0 else 1e-6
    raise ValueError("whiten: X^T X is not positive definite even with damping")


@torch.library.custom_op("tensorslim::unwhiten", mutates_args=(), device_types="cpu")
def _unwhiten(vt: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(vt)
    _C.unwhiten(_views.view(vt, "vt"), _views.view(l, "l"), _views.view(out, "out"))
    return out


@_unwhiten.register_fake
def _unwhiten_fake(vt, l):
    return torch.empty_like(vt)


def unwhiten(vt: torch.Tensor, l: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """vt @ l^-1 by a triangular solve: the whitened right factor mapped back to the inputs."""
    _check_matrix(vt, "unwhiten")
    _check_matrix(l, "unwhiten")
    if l.shape != (vt.shape[1], vt.shape[1]):
        raise ValueError(f"unwhiten: l must be [{vt.shape[1]}, {vt.shape[1]}], got {tuple(l.shape)}")
    _check_backend(backend)
    if backend == "reference":
        x = torch.linalg.solve_triangular(l.double().T, vt.double().T, upper=True)
        return x.T.float().contiguous()
    return _unwhiten(_f32(vt), _f32(l))


# ---------------------------------------------------------------- Tucker-2 and CP of conv kernels


@torch.library.custom_op("tensorslim::tucker2_spectra", mutates_args=(), device_types="cpu")
def _tucker_spectra(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    s_out, s_in = _tucker_spectra_fake(w)
    _C.tucker2_spectra(_views.view(w, "w"), _views.view(s_out, "s_out"), _views.view(s_in, "s_in"))
    return s_out, s_in


@_tucker_spectra.register_fake
def _tucker_spectra_fake(w):
    return w.new_empty(w.shape[0]), w.new_empty(w.shape[1])


def tucker2_spectra(w: torch.Tensor, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Singular values of a conv kernel's output-channel and input-channel unfoldings."""
    _check_matrix(w, "tucker2_spectra", ndim=4)
    _check_backend(backend)
    if backend == "reference":
        a = w.detach().double().cpu()
        return (torch.linalg.svdvals(a.flatten(1)).float(),
                torch.linalg.svdvals(a.transpose(0, 1).flatten(1)).float())
    return _tucker_spectra(_f32(w))


class Tucker2(NamedTuple):
    u_out: torch.Tensor  # [O, r_out], orthonormal columns
    u_in: torch.Tensor   # [I, r_in], orthonormal columns
    core: torch.Tensor   # [r_out, r_in, kh, kw]
    rel_error: float


@torch.library.custom_op("tensorslim::tucker2", mutates_args=(), device_types="cpu")
def _tucker2(w: torch.Tensor, r_out: int, r_in: int, als_sweeps: int
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    u_out, u_in, core, err = _tucker2_fake(w, r_out, r_in, als_sweeps)
    err[0] = _C.tucker2(_views.view(w, "w"), als_sweeps, _views.view(u_out, "u_out"),
                        _views.view(u_in, "u_in"), _views.view(core, "core"))
    return u_out, u_in, core, err


@_tucker2.register_fake
def _tucker2_fake(w, r_out, r_in, als_sweeps):
    O, I, kh, kw = w.shape
    return (w.new_empty(O, r_out), w.new_empty(I, r_in), w.new_empty(r_out, r_in, kh, kw),
            w.new_empty(1, dtype=torch.float64))


def _check_ranks(w: torch.Tensor, ranks, fn: str) -> None:
    for r, dim, what in ((ranks[0], w.shape[0], "output-channel"), (ranks[1], w.shape[1], "input-channel")):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= dim:
            raise ValueError(f"{fn}: {what} rank must be an int in 1..{dim}, got {r!r}")


def tucker2(w: torch.Tensor, r_out: int, r_in: int, als_sweeps: int = 2, backend: str = "auto") -> Tucker2:
    """Tucker-2 of a conv kernel [O, I, kh, kw] over its channel modes: HOSVD, then als_sweeps
    HOOI sweeps; w ~ core x0 u_out x1 u_in."""
    _check_matrix(w, "tucker2", ndim=4)
    _check_ranks(w, (r_out, r_in), "tucker2")
    if als_sweeps < 0:
        raise ValueError(f"tucker2: als_sweeps must be >= 0, got {als_sweeps}")
    _check_backend(backend)
    if backend == "reference":
        return tucker2_reference(w, r_out, r_in, als_sweeps)
    u_out, u_in, core, err = _tucker2(_f32(w), r_out, r_in, int(als_sweeps))
    return Tucker2(u_out, u_in, core, float(err[0]))


def tucker2_reference(w, r_out, r_in, als_sweeps=2) -> Tucker2:
    """HOSVD (+ HOOI) in float64 with torch.linalg.svd of the unfoldings."""
    a = w.detach().double().cpu()

    def leading(t, mode, r):  # leading left singular vectors of the mode's unfolding
        return torch.linalg.svd(t.movedim(mode, 0).flatten(1), full_matrices=False)[0][:, :r]

    u = leading(a, 0, r_out)
    v = leading(a, 1, r_in)
    for _ in range(als_sweeps):
        u = leading(torch.einsum("oihw,ir->orhw", a, v), 0, r_out)
        v = leading(torch.einsum("oihw,or->rihw", a, u), 1, r_in)
    core = torch.einsum("oihw,or,is->rshw", a, u, v)
    rec = torch.einsum("rshw,or,is->oihw", core, u, v)
    err = float((a - rec).norm() / a.norm()) if float(a.norm()) > 0 else 0.0
    return Tucker2(u.float(), v.float(), core.float(), err)


class CP(NamedTuple):
    a: torch.Tensor  # [O, R]
    b: torch.Tensor  # [I, R]
    c: torch.Tensor  # [kh, R]
    d: torch.Tensor  # [kw, R]
    rel_error: float


@torch.library.custom_op("tensorslim::cp_als", mutates_args=(), device_types="cpu")
def _cp(w: torch.Tensor, rank: int, iters: int, seed: int
        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b, c, d, err = _cp_fake(w, rank, iters, seed)
    err[0] = _C.cp_als(_views.view(w, "w"), iters, seed, _views.view(a, "a"), _views.view(b, "b"),
                       _views.view(c, "c"), _views.view(d, "d"))
    return a, b, c, d, err


@_cp.register_fake
def _cp_fake(w, rank, iters, seed):
    return tuple(w.new_empty(n, rank) for n in w.shape) + (w.new_empty(1, dtype=torch.float64),)


def cp_als(w: torch.Tensor, rank: int, iters: int = 50, seed: int = 0, backend: str = "auto") -> CP:
    """CP decomposition of a conv kernel [O, I, kh, kw] by alternating least squares:
    w[o,i,y,x] ~ sum_r a[o,r] b[i,r] c[y,r] d[x,r]. Stops early when a sweep stops helping."""
    _check_matrix(w, "cp_als", ndim=4)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"cp_als: rank must be a positive int, got {rank!r}")
    if iters < 1:
        raise ValueError(f"cp_als: iters must be >= 1, got {iters}")
    _check_backend(backend)
    if backend == "reference":
        return cp_als_reference(w, rank, iters)
    a, b, c, d, err = _cp(_f32(w), rank, int(iters), int(seed))
    return CP(a, b, c, d, float(err[0]))


def cp_als_reference(w, rank, iters=50) -> CP:
    """CP-ALS in float64 PyTorch with the same start (leading singular vectors, then Gaussian
    columns from its own generator) and update order."""
    t = w.detach().double().cpu()
    gen = torch.Generator().manual_seed(0)
    f = []
    for mode in range(4):
        u = torch.linalg.svd(t.movedim(mode, 0).flatten(1), full_matrices=False)[0]
        extra = torch.randn(t.shape[mode], max(0, rank - u.shape[1]), generator=gen, dtype=torch.float64)
        f.append(torch.cat([u[:, :rank], extra / extra.norm(dim=0).clamp(min=1e-30)], 1))
    letters = "oiyx"

    def rebuild(fs):
        return torch.einsum("or,ir,yr,xr->oiyx", *fs)

    lam, prev = torch.ones(rank, dtype=torch.float64), 2.0
    for _ in range(iters):
        for mode in range(4):
            others = [q for q in range(4) if q != mode]
            v = torch.ones(rank, rank, dtype=torch.float64)
            for q in others:
                v = v * (f[q].T @ f[q])
            v = v + (1e-12 * v.trace() / rank) * torch.eye(rank, dtype=torch.float64)
            spec = "oiyx," + ",".join(f"{letters[q]}r" for q in others) + f"->{letters[mode]}r"
            m = torch.einsum(spec, t, *[f[q] for q in others])
            f[mode] = torch.linalg.solve(v, m.T).T
            lam = f[mode].norm(dim=0)
            f[mode] = f[mode] / torch.where(lam > 0, lam, torch.ones_like(lam))
        err = float((t - rebuild([f[0] * lam] + f[1:])).norm() / t.norm())
        if prev - err < 1e-6:
            break
        prev = err
    f[0] = f[0] * lam
    err = float((t - rebuild(f)).norm() / t.norm())
    return CP(*(x.float() for x in f), err)
