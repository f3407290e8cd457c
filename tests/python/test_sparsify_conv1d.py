"""ts.sparsify on GPT-2's Conv1D layers (y = x @ W + b, W [in, out]), which it compresses as
the nn.Linear they equal (weight W.T). References: the same GPT-2 with its Conv1D rewritten by
hand as nn.Linear and sparsified alike (bit for bit the same sparse weights and logits), the
dense model with the stored zeros applied to its own Conv1D weights (fp32 tolerance), masks
computed here from |W| for magnitude, exact zero counts, and the Report's rows."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import tensorslim as ts  # noqa: E402
from tiny_gpt2 import (CALIB, CONV1D_NAMES, IDS, assert_state_unchanged, linear_twin, logits,  # noqa: E402
                       state_copy, tiny_gpt2)

CONFIGS = {
    "nm_magnitude": lambda: ts.NM(2, 4),
    "nm_wanda": lambda: ts.NM(2, 4, method="wanda"),
    "nm_sparsegpt": lambda: ts.NM(2, 4, method="sparsegpt"),
    "csr_magnitude": lambda: ts.Unstructured(0.5),
    "csr_wanda": lambda: ts.Unstructured(0.5, method="wanda"),
    "csr_sparsegpt": lambda: ts.Unstructured(0.5, method="sparsegpt"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def masked_reference(dense, sparse_model):
    """dense (the original GPT-2) with each Conv1D weight replaced by what the sparse module
    stores, transposed back to [in, out]: the dense computation of the sparsified model."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name in CONV1D_NAMES:
            ref.get_submodule(name).weight.copy_(sparse_model.get_submodule(name).dense_weight().t())
    return ref


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_conv1d_sparsified_like_its_linear_twin(kind):
    model = tiny_gpt2()
    dense = copy.deepcopy(model)
    twin = linear_twin(model)
    cfg = CONFIGS[kind]()
    report = ts.sparsify(model, cfg, calib_data=CALIB, progress=False)
    ts.sparsify(twin, CONFIGS[kind](), calib_data=CALIB, progress=False)

    rows = {c.name: c for c in report.changes if c.module_type == "Conv1D"}
    assert set(rows) == CONV1D_NAMES and all(r.action == "sparsified" for r in rows.values()), report
    assert all(cfg.method in r.format for r in rows.values())  # calibrated in its block, not the fallback
    assert [c.name for c in report.skipped if c.module_type == "Linear"] == ["lm_head"]
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    sparse_cls = ts.NMSparseLinear if isinstance(cfg, ts.NM) else ts.CSRSparseLinear
    for name in CONV1D_NAMES:
        mine, theirs = model.get_submodule(name), twin.get_submodule(name)
        assert type(mine) is sparse_cls
        assert torch.equal(mine.dense_weight(), theirs.dense_weight()), name
        conv = dense.get_submodule(name)
        assert (mine.out_features, mine.in_features) == (conv.nf, conv.nx)
        assert torch.equal(mine.bias, conv.bias)
    assert torch.equal(logits(model), logits(twin))
    torch.testing.assert_close(logits(model), logits(masked_reference(dense, model)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nm_magnitude", "nm_wanda", "csr_magnitude", "csr_wanda"])
def test_kept_weights_and_pattern_along_input_features(kind):
    """Magnitude / Wanda keep weights as they are; the pattern runs along each output feature's
    input features, i.e. down a COLUMN of the Conv1D weight."""
    model = tiny_gpt2()
    dense = copy.deepcopy(model)
    cfg = CONFIGS[kind]()
    ts.sparsify(model, cfg, calib_data=CALIB, progress=False)
    for name in CONV1D_NAMES:
        w = dense.get_submodule(name).weight.detach()  # [in, out]
        got = model.get_submodule(name).dense_weight()  # [out, in]
        keep = got != 0  # random weights: no kept weight is exactly 0
        assert torch.equal(got, w.t() * keep), name
        out_f, in_f = got.shape
        if isinstance(cfg, ts.NM):
            assert torch.equal(keep.reshape(out_f, in_f // 4, 4).sum(-1), torch.full((out_f, in_f // 4), 2))
        elif cfg.method == "magnitude":
            assert int((~keep).sum()) == round(0.5 * w.numel())
        else:  # Wanda: per output row
            assert torch.equal((~keep).sum(1), torch.full((out_f,), round(0.5 * in_f)))
        if kind == "nm_magnitude":  # the two largest |W.T| of every 4 consecutive input features
            groups = w.t().abs().reshape(out_f, in_f // 4, 4)
            expect = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
            assert torch.equal(keep, expect.reshape(out_f, in_f)), name
        if kind == "csr_magnitude":  # the layer's half of smallest |w|
            t = torch.kthvalue(w.abs().flatten(), round(0.5 * w.numel())).values
            assert torch.equal(keep, (w.abs() > t).t()), name


def test_wanda_uses_the_calibration_inputs():
    """Wanda's hooks see the Conv1D layers' inputs: its masks are not magnitude's, and other
    calibration data gives other masks."""
    a, b, mag = tiny_gpt2(), tiny_gpt2(), tiny_gpt2()
    ts.sparsify(a, ts.NM(2, 4, method="wanda"), calib_data=CALIB, progress=False)
    other = [torch.full((2, 12), 5)]  # one token repeated: other input norms
    ts.sparsify(b, ts.NM(2, 4, method="wanda"), calib_data=other, progress=False)
    ts.sparsify(mag, ts.NM(2, 4), progress=False)
    name = "transformer.h.0.mlp.c_proj"
    wa, wb, wm = (m.get_submodule(name).dense_weight() != 0 for m in (a, b, mag))
    assert not torch.equal(wa, wm) and not torch.equal(wa, wb)


@pytest.mark.parametrize("kind", ["nm_wanda", "csr_magnitude"])
def test_save_load_round_trip(kind, tmp_path):
    model = tiny_gpt2()
    ts.sparsify(model, CONFIGS[kind](), calib_data=CALIB, progress=False)
    path = tmp_path / "gpt2.slim.safetensors"
    ts.save(model, path)
    fresh = tiny_gpt2(seed=5)  # other weights: everything must come from the file
    ts.load(fresh, path)
    for name in CONV1D_NAMES:
        assert torch.equal(fresh.get_submodule(name).dense_weight(), model.get_submodule(name).dense_weight())
    assert torch.equal(logits(fresh), logits(model))


def test_excluded_conv1d_stays_conv1d_with_its_weights():
    model = tiny_gpt2()
    before = state_copy(model)
    report = ts.sparsify(model, ts.NM(2, 4, method="wanda", exclude=["*.attn.*"]), calib_data=CALIB,
                         progress=False)
    skipped = {c.name for c in report.skipped if c.module_type == "Conv1D"}
    assert skipped == {n for n in CONV1D_NAMES if ".attn." in n}
    for name in skipped:
        mod = model.get_submodule(name)
        assert type(mod) is Conv1D
        assert torch.equal(mod.weight, before[name + ".weight"]) and torch.equal(mod.bias, before[name + ".bias"])
    assert {c.name for c in report.changed} == CONV1D_NAMES - skipped


def test_pruned_conv1d_stored_sparse_as_is():
    """ts.prune masks the Conv1D weights; SparseStorage stores those zeros, transposed to the
    sparse module's [out, in], and computes what the masked model computed."""
    model = tiny_gpt2()
    ts.prune(model, ts.Magnitude(sparsity=0.5), progress=False)
    pruned = {n: model.get_submodule(n).weight.detach().clone() for n in CONV1D_NAMES}
    expect = logits(model)
    report = ts.sparsify(model, ts.SparseStorage(layout="csr"), progress=False)
    assert {c.name for c in report.changed if c.module_type == "Conv1D"} == CONV1D_NAMES
    for name, w in pruned.items():
        assert torch.equal(model.get_submodule(name).dense_weight(), w.t())
    torch.testing.assert_close(logits(model), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nm_magnitude", "nm_wanda", "csr_sparsegpt"])
def test_failure_leaves_the_model_as_it_was(kind):
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 7] = float("nan")
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"layer 'transformer\.h\.1\.mlp\.c_fc' \(Conv1D\).*NaN or Inf"):
        ts.sparsify(model, CONFIGS[kind](), calib_data=CALIB, progress=False)
    assert {n for n, m in model.named_modules() if type(m) is Conv1D} == CONV1D_NAMES
    assert_state_unchanged(model, before)
