"""SparseGPT's C++ sweep against its float64 PyTorch specification, and what the method must
achieve: a valid pattern, and less output error than magnitude pruning to the same pattern."""
import pytest
import torch

from tensorslim.ops.sparsegpt import sparsegpt_prune, sparsegpt_reference


def _layer(rows, cols, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven feature scales, as activations have
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x = x * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    h = 2.0 / tokens * x.T.double() @ x.double()
    return w, h.float(), x


CASES = [  # (n, m, sparsity, bits, cols, block)
    (2, 4, 0.0, 0, 40, 16),
    (2, 4, 0.0, 0, 37, 16),   # a partial last group of 1 column
    (4, 8, 0.0, 0, 50, 24),
    (1, 4, 0.0, 8, 32, 128),
    (0, 0, 0.5, 0, 40, 16),
    (0, 0, 0.9, 8, 33, 8),
    (2, 4, 0.0, 4, 45, 16),
]


@pytest.mark.parametrize("n,m,sparsity,bits,cols,block", CASES)
def test_native_matches_reference(n, m, sparsity, bits, cols, block):
    w, h, _ = _layer(19, cols)
    got = sparsegpt_prune(w, h, n, m, sparsity, bits, block)
    ref = sparsegpt_reference(w, h, n, m, sparsity, bits, block)
    assert torch.equal(got.keep, ref.keep)
    assert torch.allclose(got.weight, ref.weight, rtol=1e-5, atol=1e-5)
    assert got.damp_used == ref.damp_used
    assert got.loss == pytest.approx(ref.loss, rel=1e-6)
    if bits:
        assert torch.equal(got.scales, ref.scales)
        codes = got.weight / got.scales[:, None]
        qmax = 2 ** (bits - 1) - 1
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= qmax + 1e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_given_scales_set_the_grid(bits):
    """scales given: the sweep rounds to them (native as the reference); the grid of the float
    sweep's kept weights (what ts.sparsify passes) leaves less output error than the original
    row's largest weight, whose grid clips the weights the updates grew, and at 4 bits than
    rounding the float sweep's weights afterwards (at 8 the rounding is too small to tell)."""
    w, h, x = _layer(24, 64)
    w = w * torch.rand(64, generator=torch.Generator().manual_seed(1)) * 0.2 + w.sign() * 0.1  # flat rows
    qmax = 2 ** (bits - 1) - 1
    flt = sparsegpt_prune(w, h, 2, 4)
    grid = flt.weight.abs().amax(1) / qmax
    got = sparsegpt_prune(w, h, 2, 4, bits=bits, scales=grid)
    ref = sparsegpt_reference(w, h, 2, 4, 0.0, bits, scales=grid)
    assert torch.equal(got.keep, ref.keep) and torch.equal(got.scales, grid)
    assert torch.allclose(got.weight, ref.weight, rtol=1e-5, atol=1e-5)
    codes = got.weight / grid[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= qmax + 1e-3
    own = sparsegpt_prune(w, h, 2, 4, bits=bits)
    later = torch.round(flt.weight / grid[:, None]).clamp(-qmax, qmax) * grid[:, None]
    err = {k: float((x @ (v - w).T).norm()) for k, v in
           (("given", got.weight), ("own", own.weight), ("later", later))}
    assert err["given"] < err["own"] and (bits == 8 or err["given"] < err["later"]), err


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern(n, m):
    w, h, _ = _layer(16, 64)
    res = sparsegpt_prune(w, h, n, m)
    groups = res.keep.reshape(16, -1, m).sum(2)
    assert (groups == n).all()
    assert torch.equal(res.weight != 0, res.keep & (res.weight != 0))
    assert (res.weight[~res.keep] == 0).all()


def test_unstructured_count_is_exact_per_block():
    w, h, _ = _layer(10, 40)
    res = sparsegpt_prune(w, h, sparsity=0.7, block_size=16)
    for c0 in range(0, 40, 16):
        block = res.keep[:, c0:c0 + 16]
        assert int((~block).sum()) == round(0.7 * block.numel())


def test_identity_hessian_is_magnitude_pruning():
    """With H = c I the inverse factor is diagonal, nothing is compensated: SparseGPT keeps the
    largest |w| of each group and leaves them unchanged."""
    w, _, _ = _layer(8, 24)
    res = sparsegpt_prune(w, 3.0 * torch.eye(24), 2, 4)
    top = torch.zeros(8, 6, 4, dtype=torch.bool).scatter_(2, w.abs().reshape(8, 6, 4).topk(2, dim=2).indices, True)
    assert torch.equal(res.keep, top.reshape(8, 24))
    assert torch.equal(res.weight, w * top.reshape(8, 24))


@pytest.mark.parametrize("n,m,sparsity", [(2, 4, 0.0), (0, 0, 0.5)])
def test_less_output_error_than_magnitude(n, m, sparsity):
    w, h, x = _layer(64, 128, tokens=512)
    res = sparsegpt_prune(w, h, n, m, sparsity)
    if n:
        keep = torch.zeros(64, 32, 4, dtype=torch.bool).scatter_(2, w.abs().reshape(64, 32, 4).topk(n, 2).indices, True)
        keep = keep.reshape(64, 128)
    else:
        keep = w.abs() > w.abs().flatten().kthvalue(round(sparsity * w.numel())).values
    err_mag = ((w * keep - w) @ x.T).norm()
    err_gpt = ((res.weight - w) @ x.T).norm()
    assert err_gpt < 0.8 * err_mag, (float(err_gpt), float(err_mag))


def test_dead_inputs_are_pruned_first():
    w, h, _ = _layer(6, 16)
    h[3, :] = 0
    h[:, 3] = 0
    res = sparsegpt_prune(w, h, 2, 4)
    assert (res.weight[:, 3] == 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=4, m=4), "n < m"), (dict(n=0, m=4), "n < m"), (dict(sparsity=1.0), "sparsity"),
    (dict(bits=1), "bits"), (dict(block_size=0), "block_size"), (dict(damp=float("nan")), "damp"),
    (dict(scales=torch.ones(4)), "need bits"), (dict(bits=4, scales=torch.ones(5)), "shape"),
    (dict(bits=4, scales=-torch.ones(4)), "finite and >= 0"),
])
def test_bad_arguments(kwargs, match):
    w, h, _ = _layer(4, 8)
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(w, h, **kwargs)


def test_bad_tensors():
    w, h, _ = _layer(4, 8)
    with pytest.raises(ValueError, match="h must be"):
        sparsegpt_prune(w, h[:4, :4])
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(w, h)
