"""Mixture-of-experts blocks whose experts transformers 5 keeps fused in 3-D parameters
(nn/expert_linears.py, experts.py): compressed per expert, equal to the fused module with each
expert's dequantized weights, saved and loaded into a fresh model; experts left alone go back."""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.nn import ExpertLinears
from tensorslim.nn.expert_linears import GateSpec

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402


def _mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def _gpt_oss(seed=0, experts=4):
    """A tiny GPT-OSS: gate and up interleaved, transposed weights with biases, a clamped SwiGLU
    (its biases, zero at init, drawn too so that they count)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, num_local_experts=experts, num_experts_per_tok=2,
                       max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0.0, 0.5 if "bias" in name else 0.3)  # past the clamp at 7 now and then
    return model


def _ids(n=9):
    return torch.randint(2, 64, (2, n), generator=torch.Generator().manual_seed(3))


def _routing(tokens, experts, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return index, torch.rand(tokens, k, generator=g)


class _Config:
    hidden_act = "gelu"
    _experts_implementation = "eager"


@use_experts_implementation(is_transposed=True)
class _TransposedExperts(nn.Module):
    """Weights stored [experts, in, out] (Aria's layout), with biases."""

    def __init__(self, config, experts=3, hidden=16, inter=24):
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inter))
        self.down_proj = nn.Parameter(torch.randn(experts, inter, hidden))
        self.act_fn = transformers.activations.ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):  # the eager loop, transposed weights
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                gate, up = (hidden_states[t] @ self.gate_up_proj[e]).chunk(2, dim=-1)
                out[t] += (self.act_fn(gate) * up) @ self.down_proj[e] * top_k_weights[t, j]
        return out


@use_experts_implementation(has_gate=False, has_bias=True)
class _UngatedExperts(nn.Module):
    def __init__(self, config, experts=3, hidden=16, inter=24):
        super().__init__()
        self.num_experts = experts
        self.up_proj = nn.Parameter(torch.randn(experts, inter, hidden))
        self.up_proj_bias = nn.Parameter(torch.randn(experts, inter))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter))
        self.down_proj_bias = nn.Parameter(torch.randn(experts, hidden))
        self.act_fn = transformers.activations.ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                h = self.act_fn(hidden_states[t] @ self.up_proj[e].t() + self.up_proj_bias[e])
                out[t] += (h @ self.down_proj[e].t() + self.down_proj_bias[e]) * top_k_weights[t, j]
        return out


class _Eager(nn.Module):
    """transformers' eager experts loop over [experts, out, in] weights, its gate from _apply_gate."""

    def __init__(self, config, experts=3, hidden=16, inter=24):
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 2)  # values past the clamps
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                h = self._apply_gate(hidden_states[t] @ self.gate_up_proj[e].t())
                out[t] += h @ self.down_proj[e].t() * top_k_weights[t, j]
        return out


@use_experts_implementation
class _ClampedSiluExperts(_Eager):
    """DeepSeek-V4 / GLM-5's gate: halves clamped at a limit, F.silu called directly (no act_fn)."""

    swiglu_limit = 3.0

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate.clamp(max=self.swiglu_limit)) * up.clamp(-self.swiglu_limit, self.swiglu_limit)


@use_experts_implementation
class _HalvesOaiExperts(_Eager):
    """GPT-OSS's formula over concatenated halves (MiniMax-M3's, OpenAI's privacy filter's)."""

    alpha, limit = 1.5, 4.0

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)


@use_experts_implementation
class _UnitRouteExperts(_Eager):
    """Each route weighs one (Ergo's projections): what the flags say, not what it computes."""

    def __init__(self, config):
        super().__init__(config)
        self.act_fn = transformers.activations.ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return super().forward(hidden_states, top_k_index, torch.ones_like(top_k_weights))


@use_experts_implementation
class _NormedExperts(_UnitRouteExperts):
    """A norm after the experts that no flag records."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return F.normalize(_Eager.forward(self, hidden_states, top_k_index, top_k_weights), dim=-1)


def test_gates_are_found_by_what_they_compute():
    clamped = _ClampedSiluExperts(_Config())
    assert ExpertLinears.from_experts(clamped).gate == GateSpec("halves", "act", 3.0)
    assert ExpertLinears.from_experts(clamped).hidden_act == "silu"  # F.silu, though the config says gelu
    assert ExpertLinears.from_experts(_HalvesOaiExperts(_Config())).gate == GateSpec("halves", "gpt_oss", 4.0, 1.5)
    assert ExpertLinears.from_experts(_gpt_oss().model.layers[0].mlp.experts).gate == GateSpec(
        "interleaved", "gpt_oss", 7.0, 1.702)
    for cls in (_UnitRouteExperts, _NormedExperts):
        assert "computes more than its weights say" in ExpertLinears.why_not(cls(_Config()))
    assert "empty expert weights" in ExpertLinears.why_not(_TransposedExperts(_Config(), inter=0))
    with pytest.raises(ValueError, match="GateSpec: layout must be one of"):
        ExpertLinears.from_spec({**ExpertLinears.from_experts(clamped).spec(), "gate": {"layout": "diagonal"}})


def test_forward_check_is_inconclusive_without_weights():
    """On meta tensors (a model built to load a file into) and on weights not set yet (NaN from
    torch.empty) the probe says nothing: the flags and the gate decide, as the file's spec will."""
    with torch.device("meta"):
        on_meta = _TransposedExperts(_Config())
    unset = _TransposedExperts(_Config())
    with torch.no_grad():
        unset.gate_up_proj.fill_(float("nan"))
    normed = _NormedExperts(_Config())
    assert ExpertLinears.why_not(on_meta) is None and ExpertLinears.why_not(unset) is None
    with torch.no_grad():
        normed.gate_up_proj.fill_(float("nan"))
    assert ExpertLinears.why_not(normed) is None  # what the check cannot see without weights


@pytest.mark.parametrize("make", [lambda: _mixtral().model.layers[0].mlp.experts,
                                  lambda: _TransposedExperts(_Config()), lambda: _UngatedExperts(_Config()),
                                  lambda: _gpt_oss().model.layers[0].mlp.experts,
                                  lambda: _ClampedSiluExperts(_Config()), lambda: _HalvesOaiExperts(_Config())],
                         ids=["mixtral", "transposed", "ungated_bias", "gpt_oss", "clamped_silu", "halves_oai"])
def test_unfused_experts_compute_the_fused_module(make):
    torch.manual_seed(1)
    fused = make()
    unfused = ExpertLinears.from_experts(fused)
    x = torch.randn(7, unfused.hidden_dim)
    index, weights = _routing(7, unfused.num_experts, 2)
    with torch.no_grad():
        ref = fused(x, index, weights)
        # the same products summed in another order (per-expert F.linear vs the fused bmm / matmul, whose
        # MKL kernels differ by CPU): a few ulps of the largest output (outputs reach ~100 here)
        atol = 32 * torch.finfo(torch.float32).eps * float(ref.abs().max())
        torch.testing.assert_close(unfused(x, index, weights), ref, atol=atol, rtol=1e-5)
    fused_first = getattr(fused, "gate_up_proj" if unfused.has_gate else "up_proj")
    assert unfused.first[1].weight.data_ptr() == fused_first[1].data_ptr()  # a view, nothing copied


def _dequantized_reference(original, quantized):
    """The original model with each expert's fused weights replaced by its compressed linears'
    dequantized weights (and every other quantized layer's too)."""
    ref = copy.deepcopy(original)
    mods = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            q = mods.get(name)
            if isinstance(q, ExpertLinears):
                for i in range(q.num_experts):
                    for fused, lin in ((m.gate_up_proj[i], q.gate_up[i]), (m.down_proj[i], q.down[i])):
                        (fused.t() if m.is_transposed else fused).copy_(lin.weight)
            elif isinstance(m, (nn.Linear, nn.Embedding)) and q is not None and type(q) is not type(m):
                m.weight.copy_(q.weight)  # a compressed layer's read-only dequantized weight
    return ref


@pytest.mark.parametrize("build", [_mixtral, _gpt_oss], ids=["mixtral", "gpt_oss"])
@pytest.mark.parametrize("config", [ts.Int8WeightOnly(), ts.Int4WeightOnly(group_size=32)], ids=["int8", "int4"])
def test_quantized_experts_equal_their_dequantized_weights_and_reload(config, build, tmp_path):
    model, ids = build(), _ids()
    original = copy.deepcopy(model)
    report = ts.quantize(model, config, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertLinears)
    compressed = [c.name for c in report.changed]
    for i in range(4):
        assert f"model.layers.1.mlp.experts.gate_up.{i}" in compressed
        assert f"model.layers.1.mlp.experts.down.{i}" in compressed
    ref = _dequantized_reference(original, model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    ts.save(model, tmp_path / "moe.safetensors")
    fresh = ts.load(build(seed=5), tmp_path / "moe.safetensors")
    assert isinstance(fresh.model.layers[1].mlp.experts, ExpertLinears)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    mask = torch.ones_like(ids)
    assert torch.equal(fresh.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False),
                       model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False))


def test_experts_left_alone_go_back_fused():
    model, ids = _mixtral(), _ids()
    before = model.model.layers[0].mlp.experts
    with torch.no_grad():
        want = model(ids).logits
    report = ts.quantize(model, ts.Int8WeightOnly(exclude=["*experts*"]), progress=False)
    assert model.model.layers[0].mlp.experts is before
    rows = {c.name: c for c in report.skipped}
    assert "model.layers.0.mlp.experts" in rows and rows["model.layers.0.mlp.experts"].module_type == "MixtralExperts"
    assert not any(".experts." in c.name for c in report.changes)
    assert model.model.layers[0].self_attn.q_proj.__class__ is not nn.Linear  # the rest was quantized
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=0.1)


def test_sparsified_experts():
    model, ids = _mixtral(), _ids()
    ts.sparsify(model, ts.NM(2, 4), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertLinears) and type(experts.gate_up[0]).__name__ == "NMSparseLinear"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


class _OwnGateExperts(_TransposedExperts):
    """Halves concatenated, but a gate of its own: act(up) * gate."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(up) * gate


def test_experts_with_a_gate_of_their_own_stay_fused_and_say_why():
    """A gate tensorslim does not compute (told by running the module's own _apply_gate on a
    probe, so GPT-OSS's with another limit semantics would be refused too): left fused, reported."""
    fused = use_experts_implementation(is_transposed=True)(_OwnGateExperts)(_Config())
    assert "a gate of its own" in ExpertLinears.why_not(fused)
    gpt = _gpt_oss().model.layers[0].mlp.experts
    assert ExpertLinears.why_not(gpt) is None
    gpt.limit = "7"  # not a number: not the gate ExpertLinears computes
    assert "a gate of its own" in ExpertLinears.why_not(gpt)
    model = nn.Sequential(_MoeBlock(fused))
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert model[0].experts is fused
    assert any(c.name == "0.experts" and "gate of its own" in c.reason for c in report.skipped)


def _many_experts():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def test_calibration_that_misses_experts():
    """Two tokens reach at most 4 of 16 experts, each expert calibrated on its routed tokens (the
    default): W8A8 with unreached="error" names the others and the exclude list, the model stays as it was
    (experts fused again); by default the experts it saw get static scales, the others per-token
    ones. GPTQ by default quantizes the experts it saw with GPTQ and the others by round to
    nearest, bit for bit as an RTN call gives them; with unreached="skip" the others stay float
    with a Report row."""
    two = [{"input_ids": torch.tensor([[5, 9]])}]
    routed = {"calibrate_all_experts": False}  # the default, said
    model = _many_experts()
    before = model.model.layers[0].mlp.experts
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"experts\.gate_up\.\d+'.*expert no calibration token was routed to"):
        ts.quantize(model, ts.W8A8(unreached="error", **routed), calib_data=two, progress=False)
    assert model.model.layers[0].mlp.experts is before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    with pytest.warns(RuntimeWarning, match="W8A8: .* never ran on the calibration data and got the data-free"):
        ts.quantize(model, ts.W8A8(**routed), calib_data=two, progress=False)  # per-token scales for them
    modes = [model.model.layers[0].mlp.experts.gate_up[i].mode for i in range(16)]
    assert 0 < modes.count("static") <= 4 and modes.count("dynamic") == 16 - modes.count("static")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids()).logits).all()

    model, rtn = _many_experts(), _many_experts()
    with pytest.warns(RuntimeWarning, match="GPTQ: .* never ran on the calibration data and got the data-free"):
        report = ts.quantize(model, ts.Int4WeightOnly(group_size=32, algorithm="gptq", **routed), calib_data=two,
                             progress=False)
    ts.quantize(rtn, ts.Int4WeightOnly(group_size=32), progress=False)
    experts, plain = model.model.layers[0].mlp.experts, rtn.model.layers[0].mlp.experts
    rows = {int(c.name.rsplit(".", 1)[1]): c.format for c in report.changes if ".experts.gate_up." in c.name}
    fallen = [i for i in range(16) if "rtn (never ran on the calibration data)" in rows[i]]
    assert len(rows) == 16 and 12 <= len(fallen) < 16
    assert not [c for c in report.skipped if ".experts." in c.name]
    for i in range(16):
        same = torch.equal(experts.gate_up[i].qweight, plain.gate_up[i].qweight)
        assert same == (i in fallen), i  # GPTQ's codes differ from RTN's where it calibrated
        assert torch.equal(experts.down[i].qweight, plain.down[i].qweight) == (i in fallen)

    model = _many_experts()
    report = ts.quantize(model, ts.Int4WeightOnly(group_size=32, algorithm="gptq", unreached="skip", **routed),
                         calib_data=two, progress=False)
    experts = model.model.layers[0].mlp.experts
    done = [i for i in range(16) if type(experts.gate_up[i]) is not nn.Linear]
    assert 0 < len(done) <= 4
    missed = {c.name: c.reason for c in report.skipped if ".experts.gate_up." in c.name}
    assert len(missed) == 16 - len(done) and all("never ran on the calibration data" in r for r in missed.values())


def test_every_expert_calibrated_on_every_token():
    """calibrate_all_experts=True: while calibrating, every expert takes every token (the
    block's output still sums the routed ones), so the same two tokens calibrate all 16: GPTQ
    on each (no RTN fallback), and W8A8's static input scales of a layer's experts' first
    projections all equal (they read the same rows). The quantized model routes as before."""
    two = [{"input_ids": torch.tensor([[5, 9]])}]
    model = _many_experts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "never ran" warning
        report = ts.quantize(model, ts.Int4WeightOnly(group_size=32, algorithm="gptq", calibrate_all_experts=True),
                             calib_data=two, progress=False)
    formats = {c.format for c in report.changes if ".experts." in c.name}
    assert all(f.endswith(" gptq") for f in formats) and not model.model.layers[0].mlp.experts.every_token
    assert sum(".experts." in c.name for c in report.changed) == 32
    w8a8 = _many_experts()
    ts.quantize(w8a8, ts.W8A8(smoothquant=False, calibrate_all_experts=True), calib_data=two, progress=False)
    experts = w8a8.model.layers[0].mlp.experts
    scales = {float(experts.gate_up[i].act_scale) for i in range(16)}
    assert len(scales) == 1 and all(experts.gate_up[i].mode == "static" for i in range(16))
    downs = {float(experts.down[i].act_scale) for i in range(16)}
    assert len(downs) > 1  # each expert's own intermediate activations
    with torch.no_grad():
        assert torch.isfinite(w8a8(input_ids=_ids()).logits).all()


def test_every_token_forward_sums_the_routed_experts_only():
    fused = _mixtral().model.layers[0].mlp.experts
    unfused = ExpertLinears.from_experts(fused)
    x = torch.randn(7, unfused.hidden_dim)
    index, weights = _routing(7, unfused.num_experts, 2)
    seen = []
    unfused.gate_up[3].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        want = unfused(x, index, weights)
        unfused.every_token = True
        got = unfused(x, index, weights)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert seen[-1] == 7 and (len(seen) == 1 or seen[0] < 7)


def test_save_pretrained_routes(tmp_path):
    """transformers saves Mixtral's `mlp.` as `block_sparse_moe.` (and fused experts one expert
    at a time, w1 / w2 / w3): compressed experts load back through both from_pretrained routes;
    experts left fused load through transformers' own, and ts.from_pretrained says to use it."""
    from transformers import MixtralForCausalLM

    ids = _ids()
    for exclude in ((), ("*experts*",)):
        model = _mixtral()
        ts.quantize(model, ts.Int4WeightOnly(group_size=32, exclude=list(exclude)), progress=False)
        with torch.no_grad():
            want = model(ids).logits
        where = tmp_path / f"hf{len(exclude)}"
        model.save_pretrained(where)
        plain = MixtralForCausalLM.from_pretrained(where).eval()
        with torch.no_grad():
            assert torch.equal(plain(ids).logits, want)
        if exclude:
            with pytest.raises(ValueError, match=r"experts\.0\.w1\.weight.*own from_pretrained"):
                ts.from_pretrained(MixtralForCausalLM, where)
        else:
            loaded = ts.from_pretrained(MixtralForCausalLM, where)
            assert isinstance(loaded.model.layers[0].mlp.experts, ExpertLinears)
            with torch.no_grad():
                assert torch.equal(loaded(ids).logits, want)


def test_save_pretrained_gpt_oss(tmp_path):
    """GPT-OSS's gate travels in config.json's layer specs: both from_pretrained routes rebuild
    the unfused, quantized experts with it."""
    from transformers import GptOssForCausalLM

    model, ids = _gpt_oss(), _ids()
    ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    for loaded in (GptOssForCausalLM.from_pretrained(tmp_path).eval(), ts.from_pretrained(GptOssForCausalLM, tmp_path)):
        experts = loaded.model.layers[1].mlp.experts
        assert isinstance(experts, ExpertLinears) and experts.gate == GateSpec("interleaved", "gpt_oss", 7.0, 1.702)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)


def test_printed_report_collapses_expert_runs():
    """16 experts' rows print as one row per projection and layer (the Report keeps them all)."""
    model = _many_experts()
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert sum(".experts." in c.name for c in report.changed) == 32
    text = str(report)
    up = next(line for line in text.splitlines() if "experts.gate_up.{0..15}" in line)
    assert "16 layers" in up and "experts.gate_up.3 " not in text
    expected = sum(c.bytes_after for c in report.changed if ".experts.gate_up." in c.name)
    assert ts.report._fmt_bytes(expected) in up
    assert "experts.down.{0..15}" in str(ts.summary(model))


class _MoeBlock(nn.Module):
    """A router (top-2 of a linear's scores) in front of an experts module, with a residual."""

    def __init__(self, experts: nn.Module, hidden=16):
        super().__init__()
        self.router, self.experts = nn.Linear(hidden, experts.num_experts), experts

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, index = torch.softmax(self.router(flat), dim=-1).topk(2, dim=-1)
        return x + self.experts(flat, index, weights).reshape(x.shape)


def _zeroed_like_pruned(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """`original` with each expert's neurons that `pruned` no longer has zeroed (found by their
    down-projection weights)."""
    ref = copy.deepcopy(original)
    pruned_mods = dict(pruned.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if not name or ExpertLinears.why_not(m) is not None:
                continue
            new = pruned_mods[name]
            down_o, down_n = (m.down_proj, new.down_proj) if not m.is_transposed else \
                (m.down_proj.transpose(1, 2), new.down_proj.transpose(1, 2))
            inter = down_o.shape[2]
            first = m.gate_up_proj if m.has_gate else m.up_proj
            for e in range(down_o.shape[0]):
                kept = {i for i in range(inter) if any(torch.equal(down_o[e][:, i], down_n[e][:, j])
                                                       for j in range(down_n.shape[2]))}
                assert len(kept) == down_n.shape[2]
                for i in set(range(inter)) - kept:
                    down_o[e][:, i] = 0
                    rows = ((i, inter + i) if m.is_concatenated else (2 * i, 2 * i + 1)) if m.has_gate else (i,)
                    for r in rows:
                        if m.is_transposed:
                            first[e][:, r] = 0
                        else:
                            first[e][r] = 0
                        if m.has_bias:
                            getattr(m, "gate_up_proj_bias" if m.has_gate else "up_proj_bias")[e][r] = 0
    return ref


@pytest.mark.parametrize("build", [_mixtral, lambda: nn.Sequential(_MoeBlock(_TransposedExperts(_Config()))),
                                   lambda: nn.Sequential(_MoeBlock(_UngatedExperts(_Config()))), _gpt_oss],
                         ids=["mixtral", "transposed", "ungated_bias", "gpt_oss"])
@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_channel_prune_expert_neurons(build, importance, tmp_path):
    """Each expert loses half its neurons (its own lowest), the fused tensors stay fused, and the
    model equals its original with those neurons zeroed; a Mixtral reloads into a fresh one."""
    torch.manual_seed(0)
    model = build().eval()
    hf = hasattr(model, "model")
    batch = {"input_ids": _ids()} if hf else torch.randn(2, 5, 16)
    original = copy.deepcopy(model)
    cfg = ts.ChannelPrune(ratio=0.5, head_ratio=0, round_to=4, importance=importance)
    kw = {"calib_data": [batch]} if importance == "taylor" else {}
    report = ts.prune(model, cfg, example_inputs=batch, progress=False, **kw)
    experts = {n: m for n, m in model.named_modules() if n.endswith("experts")}
    assert experts and set(experts) <= {c.name for c in report.changed}
    for m in experts.values():
        inter = m.down_proj.shape[1] if m.is_transposed else m.down_proj.shape[2]
        assert inter in (12, 32, 24)  # 24 -> 12, Mixtral's 64 -> 32, GPT-OSS's 48 -> 24
    ref = _zeroed_like_pruned(original, model)
    with torch.no_grad():
        got = model(**batch).logits if hf else model(batch)
        want = ref(**batch).logits if hf else ref(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if hf:
        ts.save(model, tmp_path / "pruned.safetensors")
        fresh = ts.load(build(seed=3), tmp_path / "pruned.safetensors")
        count = "intermediate_dim" if build is _mixtral else "intermediate_size"
        assert getattr(fresh.model.layers[0].mlp.experts, count) == inter
        with torch.no_grad():
            assert torch.equal(fresh(**batch).logits, got)


def test_channel_prune_experts_excluded_or_emptied():
    model = _mixtral()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.experts': ratio 0.995 leaves 0 of an expert's 64"):
        ts.prune(model, ts.ChannelPrune(ratio=0.995, head_ratio=0, round_to=1), example_inputs={"input_ids": _ids()},
                 progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, exclude=["*experts"]), example_inputs={"input_ids": _ids()},
                      progress=False)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 128, 32)
    assert any(c.name == "model.layers.0.mlp.experts" and "excluded" in c.reason for c in report.skipped)


def test_pruned_then_quantized_experts_reload(tmp_path):
    """Experts pruned (fused, smaller), then quantized (unfused): the file holds no fused
    tensors, so ts.load takes the pruned count from the header before rebuilding them."""
    model, ids = _mixtral(), _ids()
    ts.prune(model, ts.ChannelPrune(ratio=0.5), example_inputs={"input_ids": ids}, progress=False)
    ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    assert model.model.layers[0].mlp.experts.intermediate_dim == 32
    ts.save(model, tmp_path / "pruned_int4.safetensors")
    fresh = ts.load(_mixtral(seed=4), tmp_path / "pruned_int4.safetensors")
    assert isinstance(fresh.model.layers[0].mlp.experts, ExpertLinears)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_channel_prune_taylor_ranks_experts_without_gradient_by_l1():
    """Two tokens reach at most 4 of 16 experts: the others have no gradient, so taylor
    importance is zero for all their neurons (index order). They are ranked by l1 instead,
    keeping what an l1 prune keeps, and the row says how many."""
    ids = {"input_ids": torch.tensor([[5, 9]])}
    routed = set()
    model, by_l1 = _many_experts(), _many_experts()
    hook = model.model.layers[0].mlp.experts.register_forward_hook(
        lambda mod, args, out: routed.update(args[1].flatten().tolist()))
    with torch.no_grad():
        model(**ids)
    hook.remove()
    cfg = ts.ChannelPrune(ratio=0.5, head_ratio=0, importance="taylor", include=["*experts"])
    report = ts.prune(model, cfg, example_inputs=ids, calib_data=[ids], progress=False)
    ts.prune(by_l1, dataclasses.replace(cfg, importance="l1"), example_inputs=ids, progress=False)
    row = next(c for c in report.changed if c.name == "model.layers.0.mlp.experts")
    assert 0 < len(routed) <= 4 and row.reason == f"{16 - len(routed)} experts without a gradient ranked by l1"
    taylor, l1 = model.model.layers[0].mlp.experts.down_proj, by_l1.model.layers[0].mlp.experts.down_proj
    for e in range(16):
        assert torch.equal(taylor[e], l1[e]) == (e not in routed), e  # taylor chose otherwise where it saw tokens


def test_channel_prune_bfloat16_experts():
    """A half model's experts prune too: the zeroed-original check runs in float32, where the
    pruned and zeroed sums cannot round apart."""
    model, ids = _mixtral().to(torch.bfloat16), _ids()
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0), example_inputs={"input_ids": ids},
                      progress=False)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 64, 32) and experts.gate_up_proj.dtype == torch.bfloat16
    assert "model.layers.1.mlp.experts" in {c.name for c in report.changed}
