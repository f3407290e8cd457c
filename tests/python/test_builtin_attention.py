"""torch's nn.MultiheadAttention and nn.TransformerEncoderLayer under the verbs: the attention
projections are compressed, torch's fused fast path (which read the compressed layers'
dequantized `.weight` and never ran their kernels) is declined, the rest stays torch's."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import tensorslim as ts
from tensorslim.nn import CompressedLinear, ProjectedMultiheadAttention


def _mha(batch_first=True, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(16, 4, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                              kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    with torch.no_grad():  # torch initializes these biases to zero: make them count
        for p in (m.bias_k, m.bias_v, m.in_proj_bias, m.out_proj.bias):
            if p is not None:
                p.normal_()
    return m


OPTIONS = list(itertools.product([False, True], [True, False], [False, True], [False, True], [None, 12]))


@pytest.mark.parametrize("batch_first,bias,add_bias_kv,add_zero_attn,kdim", OPTIONS)
def test_projected_attention_computes_what_multihead_attention_does(batch_first, bias, add_bias_kv,
                                                                    add_zero_attn, kdim):
    m = _mha(batch_first, bias, add_bias_kv, add_zero_attn, kdim)
    p = ProjectedMultiheadAttention.from_float(m)
    n, tgt, src, kd = 3, 5, 7, kdim or 16
    g = torch.Generator().manual_seed(1)

    def inp(length, width):
        return torch.randn(*((n, length) if batch_first else (length, n)), width, generator=g)

    q, k, v = inp(tgt, 16), inp(src, kd), inp(src, kd)
    padding = torch.rand(n, src, generator=g) < 0.3
    padding[:, 0] = False  # no fully masked row (NaN in both)
    bool_mask = torch.rand(tgt, src, generator=g) < 0.2
    bool_mask[:, 0] = False
    causal = torch.triu(torch.full((tgt, src), float("-inf")), 1)
    cases = [{}, {"key_padding_mask": padding}, {"attn_mask": bool_mask},
             {"attn_mask": torch.randn(tgt, src, generator=g), "key_padding_mask": padding.float() * -1e4},
             {"attn_mask": torch.randn(n * 4, tgt, src, generator=g), "average_attn_weights": False},
             {"need_weights": False}, {"need_weights": False, "attn_mask": bool_mask, "key_padding_mask": padding},
             {"need_weights": False, "attn_mask": causal, "is_causal": True}]
    for kw in cases:
        want, got = m(q, k, v, **kw), p(q, k, v, **kw)
        assert got[0].shape == want[0].shape
        assert torch.allclose(got[0], want[0], atol=1e-6, rtol=1e-5), kw
        if want[1] is None:
            assert got[1] is None
        else:
            assert torch.allclose(got[1], want[1], atol=1e-6, rtol=1e-5), kw
    # unbatched inputs, as nn.MultiheadAttention takes them
    want, got = m(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0],
                  v[0] if batch_first else v[:, 0]), None
    got = p(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0], v[0] if batch_first else v[:, 0])
    assert got[0].shape == want[0].shape and torch.allclose(got[0], want[0], atol=1e-6, rtol=1e-5)


def test_projected_attention_gradients_and_errors():
    m = _mha()
    p = ProjectedMultiheadAttention.from_float(m)
    x = torch.randn(2, 6, 16, requires_grad=True)
    gm = torch.autograd.grad(m(x, x, x)[0].sum(), [x, m.in_proj_weight])
    gp = torch.autograd.grad(p(x, x, x)[0].sum(), [x, p.q_proj.weight])
    assert torch.allclose(gm[0], gp[0], atol=1e-5)
    assert torch.allclose(gm[1][:16], gp[1], atol=1e-5)
    with pytest.raises(ValueError, match="attn_mask must be"):
        p(x, x, x, attn_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        p(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        p(x, x, x, is_causal=True)
    with pytest.raises(TypeError, match="bool or floating"):
        p(x, x, x, key_padding_mask=torch.zeros(2, 6, dtype=torch.int64))


def _encoder(layers=2, width=64, heads=4, nested=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, heads, 2 * width, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested).eval()


def _count_kernel_calls(model):
    calls = []
    for name, mod in model.named_modules():
        if isinstance(mod, CompressedLinear):
            inner = mod.kernel_forward
            mod.kernel_forward = (lambda f, n: lambda x: (calls.append(n), f(x))[1])(inner, name)
    return calls


VERBS = {
    "int8_dynamic": lambda m, data: ts.quantize(m, ts.Int8Dynamic(), progress=False),
    "int4": lambda m, data: ts.quantize(m, ts.Int4WeightOnly(group_size=32), progress=False),
    "gptq": lambda m, data: ts.quantize(m, ts.GPTQ(group_size=32), calib_data=data, progress=False),
    "w8a8": lambda m, data: ts.quantize(m, ts.W8A8(), calib_data=data, progress=False),
    "nm": lambda m, data: ts.sparsify(m, ts.NM(), progress=False),
    "svd": lambda m, data: ts.factorize(m, ts.SVD(rank=16), progress=False),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_encoder_projections_compressed_and_their_kernels_run_in_inference(verb):
    enc = _encoder()
    data = [torch.randn(2, 10, 64) for _ in range(2)]
    model = copy.deepcopy(enc)
    report = VERBS[verb](model, data)
    attn = model.layers[0].self_attn
    assert isinstance(attn, ProjectedMultiheadAttention)
    names = {c.name for c in report.changed}
    for i in range(2):
        assert {f"layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= names
        assert {f"layers.{i}.linear1", f"layers.{i}.linear2"} <= names
    x = torch.randn(3, 10, 64)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 7:] = True
    if verb != "svd":
        calls = _count_kernel_calls(model)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                calls.clear()
                model(x)
                assert len(calls) == 12  # 6 linears per layer: torch's fused path is declined
                calls.clear()
                model(x, src_key_padding_mask=padding)  # the nested-tensor path too
                assert len(calls) == 12
    # the compressed model against the float model computing with the layers' effective weights
    ref = copy.deepcopy(enc)
    with torch.no_grad():
        for i in range(2):
            got_attn, want_attn = model.layers[i].self_attn, ref.layers[i].self_attn
            w = [_effective(getattr(got_attn, p)) for p in ("q_proj", "k_proj", "v_proj")]
            want_attn.in_proj_weight.copy_(torch.cat(w))
            want_attn.out_proj.weight.copy_(_effective(got_attn.out_proj))
            for lin in ("linear1", "linear2"):
                getattr(ref.layers[i], lin).weight.copy_(_effective(getattr(model.layers[i], lin)))
        got, want = model(x, src_key_padding_mask=padding), ref(x, src_key_padding_mask=padding)
    keep = ~padding  # torch's nested path leaves padded rows zero, ours computes them
    # relative RMS error: activation rounding for the INT8 ones, float rounding for the rest
    tol = {"int8_dynamic": 0.02, "w8a8": 0.05}.get(verb, 1e-5)
    err = (got[keep] - want[keep]).pow(2).mean().sqrt() / want[keep].pow(2).mean().sqrt()
    assert err <= tol, err


def _effective(layer):
    if isinstance(layer, nn.Linear):
        return layer.weight
    if hasattr(layer, "effective_weight"):
        return layer.effective_weight()
    return layer.weight  # LowRankLinear: the product of its factors


def test_attention_left_alone_goes_back_and_is_named_once():
    enc = _encoder()
    ts.quantize(enc, ts.Int8Dynamic(exclude=["*self_attn*"]), progress=False)
    # linear1 / linear2 were compressed: the layer's fast path must not read their .weight
    assert all(isinstance(layer.self_attn, ProjectedMultiheadAttention) for layer in enc.layers)
    assert all(type(layer.self_attn.q_proj) is nn.Linear for layer in enc.layers)
    assert all(type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
               for layer in enc.layers)  # the attention's own out_proj module, kept
    enc = _encoder()
    report = ts.quantize(enc, ts.Int8Dynamic(include=["layers.0.*"]), progress=False)
    assert isinstance(enc.layers[0].self_attn, ProjectedMultiheadAttention)
    assert type(enc.layers[1].self_attn) is nn.MultiheadAttention  # nothing changed in layer 1
    row = next(c for c in report.changes if c.name == "layers.1.self_attn")
    assert row.action == "skipped" and row.module_type == "MultiheadAttention" and "include" in row.reason
    assert not any(c.name.startswith("layers.1.self_attn.") for c in report.changes)
    assert enc.use_nested_tensor is False  # layer 0's attention is unpacked


def test_a_failing_verb_puts_every_attention_back():
    enc = _encoder()
    originals = [layer.self_attn for layer in enc.layers]
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(ValueError):
        ts.quantize(enc, ts.GPTQ(group_size=32), calib_data=[torch.full((2, 10, 64), float("nan"))],
                    progress=False)
    assert [layer.self_attn for layer in enc.layers] == originals
    assert enc.use_nested_tensor is True
    assert all(torch.equal(v, state[k]) for k, v in enc.state_dict().items())


def test_save_and_load_an_encoder_with_compressed_attention(tmp_path):
    enc = _encoder()
    x = torch.randn(2, 10, 64)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[0, 6:] = True
    ts.quantize(enc, ts.Int4WeightOnly(group_size=32, include=["layers.0.*"]), progress=False)
    ts.sparsify(enc, ts.NM(include=["layers.1.self_attn.*"]), progress=False)
    with torch.no_grad():
        want, want_padded = enc(x), enc(x, src_key_padding_mask=padding)
    path = tmp_path / "enc.safetensors"
    ts.save(enc, path)
    fresh = _encoder(nested=True)
    fresh.layers[0].self_attn.dropout = 0.1  # a training setting: does not stop the load
    with torch.no_grad():
        ts.load(fresh, path)
        got, got_padded = fresh(x), fresh(x, src_key_padding_mask=padding)  # no nested tensors
    assert isinstance(fresh.layers[0].self_attn.q_proj, ts.WeightOnlyLinear)
    assert isinstance(fresh.layers[1].self_attn.q_proj, ts.NMSparseLinear)
    assert torch.equal(got, want) and torch.equal(got_padded, want_padded)


def test_factorized_then_quantized_attention_loads(tmp_path):
    enc = _encoder(layers=1)
    ts.factorize(enc, ts.SVD(rank=16), progress=False)
    ts.quantize(enc, ts.Int8Dynamic(), progress=False)
    assert isinstance(enc.layers[0].self_attn.k_proj.down, ts.Int8Linear)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        want = enc(x)
    ts.save(enc, tmp_path / "f.safetensors")
    fresh = _encoder(layers=1)
    ts.load(fresh, tmp_path / "f.safetensors")  # the factors inside the unpacked attention's layers
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_a_pruned_out_proj_stays_pruned_when_its_attention_goes_back():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4, batch_first=True), "fc": nn.Linear(16, 16)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ts.prune(model, ts.Magnitude(sparsity=0.5, include=["attn.out_proj"]), progress=False)
    ts.quantize(model, ts.Int8Dynamic(include=["fc"]), progress=False)  # the attention goes back
    assert type(model["attn"]) is nn.MultiheadAttention
    for _ in range(3):
        x = torch.randn(2, 5, 16)
        loss = model["attn"](x, x, x)[0].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs((model["attn"].out_proj.weight == 0).float().mean().item() - 0.5) < 0.01


def test_summary_rows_follow_the_attention():
    enc = _encoder()
    ts.quantize(enc, ts.Int8Dynamic(include=["layers.0.*"]), progress=False)
    rows = {c.name for c in ts.summary(enc).skipped}
    assert "layers.1.self_attn" in rows and not any(n.startswith("layers.1.self_attn.") for n in rows)
    ts.quantize(enc, ts.Int8Dynamic(include=["layers.1.*"]), progress=False)
    rows = {c.name for c in ts.summary(enc).skipped}
    assert not any(n.startswith("layers.1.self_attn") for n in rows)  # the "not matched" row is gone
    model = nn.ModuleDict({"a": nn.MultiheadAttention(16, 4, add_bias_kv=True), "fc": nn.Linear(16, 16)})
    report = ts.quantize(model, ts.Int8Dynamic(exclude=["a.*"]), progress=False)
    assert [c.name for c in report.changes if c.name.startswith("a")] == ["a"]  # bias_k / bias_v: no row


def test_parametrized_out_proj_is_used_as_it_is():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    nn.utils.parametrizations.weight_norm(mha.out_proj)
    model = nn.ModuleDict({"attn": mha})
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = mha(x, x, x)[0]
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    attn = model["attn"]
    assert isinstance(attn, ProjectedMultiheadAttention) and attn.out_proj is mha.out_proj
    assert "parametrization" in next(c.reason for c in report.skipped if c.name == "attn.out_proj")
    with torch.no_grad():
        assert (attn(x, x, x)[0] - want).abs().max() < 0.02 * want.abs().max()


def test_multihead_attention_with_hooks_or_subclassed_stays_and_is_reported():
    class MyAttention(nn.MultiheadAttention):
        pass

    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.MultiheadAttention(16, 4), "b": MyAttention(16, 4), "fc": nn.Linear(16, 16)})
    model["a"].register_forward_hook(lambda *args: None)
    report = ts.quantize(model, ts.Int8Dynamic(), progress=False)
    assert type(model["a"]) is nn.MultiheadAttention and type(model["b"]) is MyAttention
    rows = {c.name: c for c in report.skipped}
    assert "a" in rows and "b" in rows and "in_proj_weight" in rows["a"].reason


def test_unpack_attention_before_training_and_prune():
    enc = _encoder()
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        want = enc(x)
    assert ts.unpack_attention(enc) == ["layers.0.self_attn", "layers.1.self_attn"]
    with torch.no_grad():
        assert torch.allclose(enc(x), want, atol=1e-5)
    report = ts.prune(enc, ts.Magnitude(sparsity=0.5), progress=False)
    assert "layers.0.self_attn.q_proj" in {c.name for c in report.changed}
    q = enc.layers[0].self_attn.q_proj
    assert abs((q.weight == 0).float().mean().item() - 0.5) < 0.01
    enc.train()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)  # created after the unpacking, as documented
    before = q.weight.detach().clone()
    (enc(x) * torch.randn(2, 10, 64)).sum().backward()  # (the squared output is LayerNorm's: flat)
    opt.step()
    moved = q.weight.detach() != before
    assert moved.any() and not (moved & (before == 0)).any()  # it trains; pruned weights stay zero


def test_projected_attention_in_training_and_its_gradients_with_masks():
    m = _mha(batch_first=True)
    m.train()
    p = ProjectedMultiheadAttention.from_float(m)
    p.train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    outs = []
    for mod, w in ((m, m.in_proj_weight), (p, p.q_proj.weight)):
        y, att = mod(x, x, x, key_padding_mask=padding, attn_mask=mask)
        outs.append((y, att, torch.autograd.grad(y.sum() + att.sum(), [x, w])))
    (ym, am, gm), (yp, ap, gp) = outs
    assert torch.allclose(ym, yp, atol=1e-6) and torch.allclose(am, ap, atol=1e-6)
    assert torch.allclose(gm[0], gp[0], atol=1e-5) and torch.allclose(gm[1][:16], gp[1], atol=1e-5)


def test_a_torch_pruned_out_proj_stays_as_it_is():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4, batch_first=True), "fc": nn.Linear(16, 16)})
    torch_prune.l1_unstructured(model["attn"].out_proj, "weight", amount=0.5)
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert isinstance(model["fc"], ts.WeightOnlyLinear)
    out_proj = next(c for c in report.changes if c.name == "attn.out_proj")
    assert out_proj.action == "skipped"  # its weight is torch's prune product, not a parameter


def test_loading_an_unpacked_attention_into_another_layer_is_a_clear_error(tmp_path):
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4), "fc": nn.Linear(16, 16)})
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    ts.save(model, tmp_path / "m.safetensors")
    other = nn.ModuleDict({"attn": nn.Linear(16, 16), "fc": nn.Linear(16, 16)})
    with pytest.raises(ValueError, match="'attn'"):
        ts.load(other, tmp_path / "m.safetensors")
    assert type(other["attn"]) is nn.Linear and type(other["fc"]) is nn.Linear


def test_pruned_then_quantized_encoder_saves_and_loads(tmp_path):
    # ts.prune masks the packed attention's out_proj in place; ts.quantize then unpacks the
    # attention around it (the masked out_proj stays float): the load must put the mask on the
    # out_proj of the rebuilt attention, not on the float model's
    enc = _encoder()
    ts.prune(enc, ts.Magnitude(sparsity=0.5), progress=False)
    ts.quantize(enc, ts.Int8Dynamic(), progress=False)
    attn = enc.layers[0].self_attn
    assert isinstance(attn, ProjectedMultiheadAttention) and isinstance(attn.q_proj, ts.Int8Linear)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        want = enc(x)
    ts.save(enc, tmp_path / "p.safetensors")
    fresh = _encoder()
    ts.load(fresh, tmp_path / "p.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    out_proj = fresh.layers[0].self_attn.out_proj
    assert abs((out_proj.weight == 0).float().mean().item() - 0.5) < 0.01
