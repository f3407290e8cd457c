import pytest
import torch

import tensorslim as ts

# SQNR floors (dB) for round-to-nearest weights drawn from N(0, 1), in one place.
# Uniform quantization noise has power step^2 / 12; with step = 2 * amax / (2^b - 1) and
# a Gaussian group maximum of ~3.3 sigma (512 values) or ~2.6 sigma (128 values) this
# predicts ~42 dB for INT8 per channel and ~19.5 dB for INT4 g128; floors keep ~2 dB margin.
SQNR_FLOOR_DB = {
    ("int8", None): 40.0,
    ("uint8", None): 40.0,
    ("int4", 128): 17.5,
    ("uint4", 128): 18.0,
    ("int4", 32): 19.0,
}


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().double(), got.detach().double()
    return float(20 * torch.log10(ref.norm() / (ref - got).norm()))


def skip_without_onednn() -> None:
    """Tests of oneDNN's own paths skip in builds without it (ARM; TENSORSLIM_ONEDNN=OFF)."""
    if not ts._C.built_with_onednn():
        pytest.skip("this build has no oneDNN")


@pytest.fixture(params=["scalar", "avx2", "avx2_vnni", "avx512"])
def isa(request):
    """Runs a test once per CPU code path this machine supports: "avx2_vnni" is the AVX2
    kernels with 256-bit vpdpbusd (ts._C.avx2_vnni), "avx2" without (active ISA "avx2" both)."""
    order = ["scalar", "avx2", "avx512"]
    isa_name = "avx2" if request.param == "avx2_vnni" else request.param
    if order.index(isa_name) > order.index(ts._C.best_isa()):
        pytest.skip(f"{request.param} not supported on this CPU")
    if request.param == "avx2_vnni" and not ts._C.avx2_vnni_available():
        pytest.skip("neither AVX-VNNI nor AVX512-VNNI on this CPU")
    saved, saved_vnni = ts._C.active_isa(), None
    ts._C.set_isa(isa_name)
    if isa_name == "avx2":
        saved_vnni = ts._C.avx2_vnni() != "none"
        ts._C.set_avx2_vnni(request.param == "avx2_vnni")
    yield request.param
    if saved_vnni is not None:
        ts._C.set_avx2_vnni(saved_vnni)
    ts._C.set_isa(saved)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a whole test module (`pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")`): tiny matrices, and training on a shared 2-core machine, where
    torch's threads only contend."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def check_matches_fresh_state(m, make, x, seen: list) -> None:
    """m(x) equals a module that never ran (make()) loaded with m's state dict, and differs
    from every earlier output in `seen` (each change a test makes must change it); appends it.
    For caches of derived call data that must follow in-place changes of the module's tensors."""
    fresh = make()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        y = m(x)
        assert torch.equal(y, fresh(x))
    assert not any(torch.equal(y, prev) for prev in seen)
    seen.append(y)


@pytest.fixture
def decode_calls(monkeypatch):
    """Row counts of the products ops/decode_gemm.py ran (decode + torch's GEMM), in order."""
    from tensorslim.ops import decode_gemm

    calls = []
    real = decode_gemm.linear
    # the route from DECODE_GEMM_MIN_ROWS, as CPUs other than AMD take it (decode_min_rows)
    monkeypatch.setattr(decode_gemm, "decode_min_rows", lambda: decode_gemm.DECODE_GEMM_MIN_ROWS)

    def spy(x2, decode, bias):
        calls.append(x2.shape[0])
        return real(x2, decode, bias)
    monkeypatch.setattr(decode_gemm, "linear", spy)
    return calls
