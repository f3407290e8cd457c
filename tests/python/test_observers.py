"""Activation observers: exact running min/max, streaming histograms whose memory does not
grow, and the clip ranges of percentile / MSE / KL against direct computations."""
import pytest
import torch

import tensorslim as ts
from tensorslim.quantization.observers import Observer, qparams_from_range


def _batches(n=6, seed=0, shape=(32, 48)):
    g = torch.Generator().manual_seed(seed)
    # Ranges grow batch by batch so the histogram has to re-bin several times.
    return [torch.randn(*shape, generator=g) * (1 + 2 * i) for i in range(n)]


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "kl"])
def test_running_min_max_is_exact(method):
    xs = _batches()
    t, c = Observer(method), Observer(method, "channel")
    for x in xs:
        t.update(x)
        c.update(x)
    allx = torch.cat(xs)
    assert float(t.min) == float(allx.min()) and float(t.max) == float(allx.max())
    assert torch.equal(c.min, allx.amin(0)) and torch.equal(c.max, allx.amax(0))
    assert t.count == allx.numel()


def test_histogram_memory_is_bounded_and_counts_are_kept():
    o = Observer("percentile", bins=512)
    o.update(torch.randn(100, 10))
    first = o.state_bytes()
    for x in _batches(20, seed=3):
        o.update(x)
    assert o.state_bytes() == first  # independent of the number of batches
    assert float(o.hist.sum()) == 1000 + 20 * 32 * 48  # merging bins never loses a count
    assert float(o.edge) >= float(torch.cat(_batches(20, seed=3)).abs().max())


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_percentile_matches_quantile(granularity):
    xs = _batches(seed=1, shape=(3000, 8))
    o = Observer("percentile", granularity, percentile=99.0, symmetric=True)
    for x in xs:
        o.update(x)
    lo, hi = o.range()
    allx = torch.cat(xs)
    # Our percentile is the upper edge of the histogram bin where the CDF reaches p; torch
    # interpolates between order statistics (position p * (n - 1)): they differ by < 2 bins.
    width = 2 * (2 * o.edge / o.bins).float()
    if granularity == "tensor":
        want = torch.quantile(allx.abs().flatten(), 0.99)
        assert abs(float(hi) - float(want)) <= float(width) + 1e-6 and float(lo) == -float(hi)
    else:
        want = torch.quantile(allx.abs(), 0.99, dim=0)
        assert ((hi - want).abs() <= width + 1e-6).all()


def _quant_mse(x, lo, hi, symmetric):
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), symmetric)
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    deq = ((torch.round(x / scale) + zp).clamp(qmin, qmax) - zp) * scale
    return float(((x - deq) ** 2).mean())


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_is_near_the_brute_force_optimum(symmetric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200000, generator=g)
    x[17] = 30.0  # one outlier: clipping it is cheaper than the coarse step it forces
    mse, mx = Observer("mse", symmetric=symmetric), Observer("max", symmetric=symmetric)
    for chunk in x.split(50000):
        mse.update(chunk)
        mx.update(chunk)
    lo, hi = mse.range()
    err_mse = _quant_mse(x, float(lo), float(hi), symmetric)
    err_max = _quant_mse(x, float(mx.min), float(mx.max), symmetric)
    # The reference: the same shrink search evaluated on the raw values instead of a histogram.
    best = min(_quant_mse(x, float(mx.min) * f, float(mx.max) * f, symmetric)
               for f in torch.linspace(1 / 64, 1, 64).tolist())
    assert float(hi) < 30.0 and err_mse < (0.5 if symmetric else 0.9) * err_max, (float(hi), err_mse, err_max)
    assert err_mse <= 1.05 * best, (err_mse, best)


def test_kl_threshold_on_gaussian():
    g = torch.Generator().manual_seed(0)
    o = Observer("kl", symmetric=True)
    for _ in range(4):
        o.update(torch.randn(50000, generator=g))
    lo, hi = o.range()
    # Entropy calibration clips a Gaussian well inside its max (~4.6 sigma here) but beyond 2 sigma.
    assert 2.0 < float(hi) < float(o.max) and float(lo) == -float(hi)


def test_token_qparams_match_the_kernel_scales():
    x = torch.randn(9, 64) * torch.arange(1, 10).float()[:, None]
    scale, zp = Observer("max", "token", symmetric=True).token_qparams(x)
    _, kernel_scales = ts.ops.quantize_per_token(x)
    assert torch.allclose(scale, kernel_scales, rtol=1e-6) and (zp == 0).all()
    o = Observer("max", "token")
    o.update(x)
    assert o.count == 9 and float(o.max) == float(x.abs().amax())


def test_asymmetric_qparams_cover_the_range():
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), symmetric=False)
    assert abs(float(scale) - 4 / 255) < 1e-7 and int(zp) == round(255 / 4)
    scale, zp = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), symmetric=True)
    assert float(scale) == 1.0  # an all-zero range still gives a usable scale


def test_errors():
    with pytest.raises(ValueError, match="method"):
        Observer("median")
    with pytest.raises(ValueError, match="granularity"):
        Observer("max", "row")
    with pytest.raises(ValueError, match="per-token"):
        Observer("kl", "token")
    with pytest.raises(ValueError, match="power of two"):
        Observer("mse", bins=100)
    o = Observer("percentile", "channel")
    with pytest.raises(ValueError, match="no data"):
        o.range()
    o.update(torch.randn(4, 8))
    with pytest.raises(ValueError, match="expected 8 channels"):
        o.update(torch.randn(4, 9))
    with pytest.raises(ValueError, match="NaN"):
        o.update(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(TypeError):
        o.update(torch.ones(2, 8, dtype=torch.int32))
