"""ts.Unstructured(profile="owl"): OWL's per-block sparsities (Yin et al. 2024) against a float64
reference written here from the paper's definitions, the layers pruned at them, the tiny LM's
perplexity against uniform sparsity, and bad input."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.sparsity.owl import block_sparsities


def _mlp(seed=0):
    """Three linears of unequal sizes, each its own block (an nn.Sequential's children)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 48))


def _batches(n=4, seed=1, outlier=None):
    """Random inputs; outlier: (feature, factor) scaling one input feature of every batch, which
    gives the first layer's scores a few very large columns."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(32, 64, generator=g) for _ in range(n)]
    if outlier is not None:
        for x in xs:
            x[:, outlier[0]] *= outlier[1]
    return xs


def _sparsity(mod):
    w = mod.dequantized_weight()
    return 1.0 - float((w != 0).sum()) / w.numel()


def _reference_sparsities(model, batches, sparsity, owl_m, owl_lambda):
    """Each Linear's OWL sparsity (the MLP's linears are each a block) from the dense model:
    outlier share D = fraction of |W_ij| * ||X_j||_2 above owl_m x its mean; densities
    2 lambda (D - min) / (max - min), shifted so the weight-count-weighted mean is 1 - sparsity."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    sq = {id(m): torch.zeros(m.in_features, dtype=torch.float64) for m in lins}

    def add_squares(mod, args):
        sq[id(mod)].add_((args[0].double() ** 2).sum(0))

    handles = [m.register_forward_pre_hook(add_squares) for m in lins]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    shares = []
    for m in lins:
        score = m.weight.detach().double().abs() * sq[id(m)].sqrt()[None]
        shares.append(float((score > owl_m * score.mean()).double().mean()))
    d, n = torch.tensor(shares, dtype=torch.float64), torch.tensor([float(m.weight.numel()) for m in lins],
                                                                   dtype=torch.float64)
    density = 2 * owl_lambda * (d - d.min()) / (d.max() - d.min())
    density += 1 - sparsity - (density * n).sum() / n.sum()
    return (1 - density).tolist(), shares


def test_block_sparsities_spread_by_outlier_share():
    # equal blocks: the paper's numbers; the most outliers, the least pruned
    assert block_sparsities([0.01, 0.03, 0.02], [1, 1, 1], 0.6, 0.1) == pytest.approx([0.7, 0.5, 0.6])
    # unequal blocks: the mean weighted by size, so 60% of all weights are pruned
    s = block_sparsities([0.01, 0.03, 0.02], [3, 1, 1], 0.6, 0.1)
    assert s == pytest.approx([0.66, 0.46, 0.56])
    assert (3 * s[0] + s[1] + s[2]) / 5 == pytest.approx(0.6)
    # nothing to tell the blocks apart, and lambda 0: uniform
    assert block_sparsities([0.02, 0.02], [1, 5], 0.7, 0.1) == [0.7, 0.7]
    assert block_sparsities([0.01, 0.03], [1, 1], 0.7, 0.0) == pytest.approx([0.7, 0.7])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_each_layer_pruned_at_its_reference_sparsity(method):
    model, data = _mlp(), _batches(outlier=(5, 40.0))
    want, shares = _reference_sparsities(model, data, 0.6, 5.0, 0.1)
    assert shares[0] == max(shares) and len(set(shares)) == 3  # the planted outliers are the first layer's
    report = ts.sparsify(model, ts.Unstructured(0.6, method=method, profile="owl", owl_lambda=0.1),
                         calib_data=data, progress=False)
    rows = {c.name: c for c in report.changes}
    for name, s in zip(("0", "2", "4"), want):
        mod = model.get_submodule(name)
        k = mod.in_features
        # wanda prunes round(s K) of each row; magnitude round(s N K) of the layer, as sparsegpt
        # does per block of up to block_size = 128 columns (here the whole layer)
        nk = mod.out_features * k
        assert _sparsity(mod) == pytest.approx(round(s * k) / k if method == "wanda" else round(s * nk) / nk)
        assert rows[name].action == "sparsified" and f"{s:.1%} {method} (owl)" in rows[name].format
    assert want[0] < 0.6 - 0.05  # the outlier layer keeps clearly more
    sizes = [96 * 64, 128 * 96, 48 * 128]
    assert sum(s * n for s, n in zip(want, sizes)) / sum(sizes) == pytest.approx(0.6)


def test_first_layer_matches_uniform_wanda_at_its_sparsity():
    """The first block sees the dense inputs under both profiles: OWL's result there is uniform
    Wanda's at the sparsity OWL chose for it."""
    model, data = _mlp(), _batches(outlier=(5, 40.0))
    twin = copy.deepcopy(model)
    want, _ = _reference_sparsities(model, data, 0.6, 5.0, 0.1)
    ts.sparsify(model, ts.Unstructured(0.6, method="wanda", profile="owl", owl_lambda=0.1), calib_data=data,
                progress=False)
    ts.sparsify(twin, ts.Unstructured(want[0], method="wanda", include=("0",)), calib_data=data, progress=False)
    assert torch.equal(model[0].dequantized_weight(), twin[0].dequantized_weight())


class _TwoLayers(nn.Module):
    """One block (no ModuleList, not a Sequential): OWL compares its layers one by one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 96), nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_model_of_one_block_is_compared_layer_by_layer():
    model = _TwoLayers()
    ts.sparsify(model, ts.Unstructured(0.5, method="wanda", profile="owl", owl_lambda=0.1),
                calib_data=_batches(outlier=(3, 40.0)), progress=False)
    s1, s2 = _sparsity(model.fc1), _sparsity(model.fc2)
    assert s1 < s2 and abs(s2 - s1) == pytest.approx(0.2, abs=1 / 64)  # the full 2 lambda between two layers
    assert (s1 * 96 * 64 + s2 * 32 * 96) / (96 * 64 + 32 * 96) == pytest.approx(0.5, abs=1 / 64)


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return torch.relu(self.a(x))  # b never runs


class _Branchy(nn.Module):
    def __init__(self, outlier_scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Branch() for _ in range(2)])
        with torch.no_grad():
            self.layers[0].a.weight[:, :4] *= outlier_scale

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_a_layer_the_data_never_runs_takes_its_blocks_sparsity_by_magnitude():
    model = _Branchy(outlier_scale=20.0)
    with pytest.warns(RuntimeWarning, match="data-free fallback"):
        report = ts.sparsify(model, ts.Unstructured(0.6, method="wanda", profile="owl", owl_lambda=0.1),
                             calib_data=_batches(), progress=False)
    rows = {c.name: c for c in report.changes}
    for i in (0, 1):
        a, b = model.layers[i].a, model.layers[i].b
        assert _sparsity(a) == pytest.approx(_sparsity(b), abs=1 / 64)
        assert "magnitude (owl)" in rows[f"layers.{i}.b"].format
    assert _sparsity(model.layers[0].a) < _sparsity(model.layers[1].a)


def test_tiny_lm_perplexity_owl_beats_uniform():
    """The decoder LM the paper's finding is about: at 60% Wanda, OWL's blocks (lambda 0.04)
    against every block at 60% (16 windows: 5.325 against 5.475, docs/sparsity.md)."""
    from tensorslim.eval import perplexity
    from tensorslim.eval import tiny_lm as T

    lm = T.load_tiny_lm()
    train, held = T.train_eval_split()
    ids = held[: 8 * T.SEQ_LEN]
    calib = [train[i * T.SEQ_LEN:(i + 1) * T.SEQ_LEN][None] for i in range(16)]
    ppl = {}
    for profile in ("uniform", "owl"):
        m = copy.deepcopy(lm)
        report = ts.sparsify(m, ts.Unstructured(0.6, method="wanda", profile=profile, owl_lambda=0.04),
                             calib_data=calib, progress=False)
        ppl[profile] = perplexity(m, ids, seq_len=T.SEQ_LEN)
    per_block = {}
    for c in report.changes:
        if c.action == "sparsified":
            per_block.setdefault(c.name.split(".")[2], set()).add(c.format)
    assert all(len(f) == 1 for f in per_block.values()) and len(per_block) == 3  # one sparsity per block
    assert ppl["owl"] < ppl["uniform"] - 0.1, ppl


def test_owl_needs_data_even_with_magnitude():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="profile='owl' needs calibration data"):
        ts.sparsify(model, ts.Unstructured(0.6, profile="owl"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_activations_name_the_layer_and_change_nothing():
    model = _mlp()
    data = _batches()
    data[1][0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layer '0'.*NaN or Inf"):
        ts.sparsify(model, ts.Unstructured(0.6, method="sparsegpt", profile="owl"), calib_data=data, progress=False)
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw,match", [
    (dict(profile="global"), "profile must be one of"), (dict(owl_m=0.0), "owl_m"),
    (dict(profile="owl", owl_lambda=-0.01), "owl_lambda must be in"),
    (dict(profile="owl", owl_lambda=0.2), r"owl_lambda must be in \[0, 0.2\)"),
])
def test_bad_owl_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        ts.Unstructured(0.6, **kw)


def test_owl_config_round_trips_and_is_unstructured_only():
    cfg = ts.Unstructured(0.7, method="sparsegpt", profile="owl", owl_m=7.0, owl_lambda=0.05)
    assert ts.Config.from_json(cfg.to_json()) == cfg and cfg.needs_data
    assert not ts.Unstructured(0.7).needs_data
    assert ts.Unstructured(0.95).owl_lambda == 0.08  # owl's bound (0.025 here) is checked only under owl
    with pytest.raises(TypeError, match="profile"):
        ts.NM(2, 4, profile="owl")
