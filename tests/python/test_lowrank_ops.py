"""Low-rank cores against explainable references: the SVD equals torch.linalg.svd's truncation
in float64, its truncation error is the Eckart-Young optimum, the randomized SVD stays within a
small factor of it, whitening matches a float64 Cholesky, Tucker-2 matches a float64 torch
HOSVD / HOOI, CP-ALS matches its float64 reference; fake implementations give the shapes."""
import pytest
import torch

from tensorslim.ops import lowrank as L


def decaying(m, n, decay=1.0, seed=0):
    """A [m, n] matrix with singular values 1 / (1 + j)^decay."""
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    k = min(m, n)
    s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float64)) ** decay
    return (q1[:, :k] * s) @ q2[:, :k].T


def truncate(f, k):
    return (f.u[:, :k].double() * f.s[:k].double()) @ f.vt[:k].double()


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
@pytest.mark.parametrize("double_precision", [False, True])
def test_svd_truncation_equals_torch(shape, double_precision):
    w = decaying(*shape, decay=0.7).float()
    ours = L.svd(w, double_precision=double_precision)
    ref = torch.linalg.svd(w.double(), full_matrices=False)
    assert torch.allclose(ours.s.double(), ref.S, atol=1e-5)
    for k in (1, 10, 40):
        expect = (ref.U[:, :k] * ref.S[:k]) @ ref.Vh[:k]
        assert torch.allclose(truncate(ours, k), expect, atol=2e-5), k
        # Eckart-Young: the truncation error is the norm of the dropped singular values.
        err = (w.double() - truncate(ours, k)).norm()
        assert abs(float(err) - float(ref.S[k:].norm())) < 1e-5


def test_randomized_svd_error_within_bound_of_exact():
    w = decaying(300, 240, decay=0.5, seed=1).float()
    exact = L.svd(w, double_precision=True)
    for k in (16, 64):
        best = float((w.double() - truncate(exact, k)).norm())
        for backend in ("native", "reference"):
            r = L.svd_randomized(w, k, oversample=10, power_iters=2, backend=backend)
            err = float((w.double() - truncate(r, k)).norm())
            assert best <= err + 1e-6 <= 1.05 * best + 1e-6, (k, backend, err, best)
            assert r.u.shape == (300, k) and r.vt.shape == (k, 240)


def test_whiten_matches_float64_cholesky():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(200, 40, generator=g) * torch.linspace(0.1, 3, 40)
    gram = x.T @ x / 200
    ours, ref = L.whiten(w, gram, 0.01), L.whiten_reference(w, gram, 0.01)
    assert ours.damp_used == ref.damp_used == 0.01
    assert torch.allclose(ours.l, ref.l, atol=1e-5) and torch.allclose(ours.wl, ref.wl, atol=1e-4)
    back = L.unwhiten(ours.wl, ours.l)
    assert torch.allclose(back, w, atol=1e-4)
    assert torch.allclose(back, L.unwhiten(ours.wl, ours.l, backend="reference"), atol=1e-5)


@pytest.mark.parametrize("sweeps", [0, 3])
def test_tucker2_matches_float64_hosvd(sweeps):
    w = torch.randn(24, 16, 3, 3, generator=torch.Generator().manual_seed(3))
    ours = L.tucker2(w, 10, 8, sweeps)
    ref = L.tucker2_reference(w, 10, 8, sweeps)
    assert abs(ours.rel_error - ref.rel_error) < 1e-5
    rec = torch.einsum("rshw,or,is->oihw", ours.core.double(), ours.u_out.double(), ours.u_in.double())
    assert abs(float((w.double() - rec).norm() / w.norm()) - ours.rel_error) < 1e-5
    assert torch.allclose(ours.u_out.T @ ours.u_out, torch.eye(10), atol=1e-5)
    s_out, s_in = L.tucker2_spectra(w)
    r_out, r_in = L.tucker2_spectra(w, backend="reference")
    assert torch.allclose(s_out, r_out, atol=1e-4) and torch.allclose(s_in, r_in, atol=1e-4)


def test_hooi_sweeps_do_not_increase_the_error():
    w = torch.randn(32, 24, 3, 3, generator=torch.Generator().manual_seed(4))
    errs = [L.tucker2(w, 8, 6, s).rel_error for s in (0, 1, 4)]
    assert errs[0] >= errs[1] - 1e-7 >= errs[2] - 2e-7


def test_cp_als_matches_its_reference_and_fits_an_exact_cp_kernel():
    g = torch.Generator().manual_seed(5)
    f = [torch.randn(n, 4, generator=g) for n in (12, 8, 3, 3)]
    w = torch.einsum("or,ir,yr,xr->oiyx", *f)
    assert L.cp_als(w, 4, iters=300).rel_error < 1e-3
    noisy = w + 0.3 * torch.randn(w.shape, generator=g)
    ours, ref = L.cp_als(noisy, 6, iters=30), L.cp_als_reference(noisy, 6, iters=30)
    assert abs(ours.rel_error - ref.rel_error) < 0.02
    rec = torch.einsum("or,ir,yr,xr->oiyx", ours.a, ours.b, ours.c, ours.d)
    assert abs(float((noisy - rec).norm() / noisy.norm()) - ours.rel_error) < 1e-4


def test_fake_implementations_give_shapes():
    w = torch.empty(20, 12, device="meta")
    u, s, vt = torch.ops.tensorslim.svd(w, False)
    assert (u.shape, s.shape, vt.shape) == ((20, 12), (12,), (12, 12))
    u, s, vt = torch.ops.tensorslim.svd_randomized(w, 5, 10, 2, 0)
    assert (u.shape, vt.shape) == ((20, 5), (5, 12))
    k = torch.empty(8, 6, 3, 3, device="meta")
    u_out, u_in, core, _ = torch.ops.tensorslim.tucker2(k, 4, 3, 1)
    assert core.shape == (4, 3, 3, 3) and u_in.shape == (6, 3)


def test_bad_arguments():
    w = torch.randn(10, 6)
    with pytest.raises(ValueError, match="rank must be an int in 1..min"):
        L.svd_randomized(w, 7)
    bad = w.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        L.svd(bad)
    with pytest.raises(ValueError, match="input-channel rank"):
        L.tucker2(torch.randn(4, 3, 3, 3), 2, 5)
    with pytest.raises(ValueError, match="g must be"):
        L.whiten(w, torch.eye(5))
