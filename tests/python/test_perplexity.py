"""ts.eval.perplexity against a direct computation, and the low-bit evidence on a real causal
LM (the tiny byte-level LLaMA trained on pydoc text, tests/data): at INT4 g128 and INT3 g128,
AWQ and GPTQ raise perplexity less than round-to-nearest."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers", reason="needs Hugging Face transformers")

import tensorslim as ts  # noqa: E402
from tensorslim.eval import perplexity, tiny_lm  # noqa: E402
from tensorslim.ops import calibration as C  # noqa: E402
from tensorslim.quantization import awq, gptq  # noqa: E402
from tensorslim.quantization.blockwise import WeightSpec  # noqa: E402
from tensorslim.quantization.calibrate import make_forward_loop  # noqa: E402

SEQ = 128
EVAL_TOKENS = 4096
N_CALIB = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm():
    model = tiny_lm.load_tiny_lm()
    train, held_out = tiny_lm.train_eval_split()
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(train) - SEQ, (N_CALIB,), generator=gen)
    calib = [train[i:i + SEQ][None] for i in starts]
    return model, calib, held_out[:EVAL_TOKENS]


class Bigram(nn.Module):
    """A causal LM whose logits at t depend on tokens t and t-1: context matters."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(16, 16, generator=gen))
        self.b = nn.Parameter(torch.randn(16, 16, generator=gen))

    def forward(self, ids):
        prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
        has_prev = (torch.arange(ids.shape[1]) > 0).float()[None, :, None]
        return self.a[ids] + has_prev * self.b[prev]


def _direct(model, ids, seq_len, stride):
    """Token by token: each scored token's own context window, straight from the recipe."""
    nll, count, scored_to, begin = 0.0, 0, 1, 0
    torch.set_grad_enabled(False)
    while scored_to < len(ids):
        end = min(begin + seq_len, len(ids))
        logits = model(ids[None, begin:end])[0].double()
        for pos in range(max(scored_to, begin + 1), end):
            nll -= float(F.log_softmax(logits[pos - begin - 1], -1)[ids[pos]])
            count += 1
        scored_to = end
        begin += stride
    torch.set_grad_enabled(True)
    return math.exp(nll / count), nll, count


@pytest.mark.parametrize("seq_len,stride", [(8, 8), (8, 3), (8, 1), (50, 7)])
def test_perplexity_matches_direct_computation(seq_len, stride):
    model = Bigram()
    ids = torch.randint(0, 16, (41,), generator=torch.Generator().manual_seed(3))
    ppl, nll, count = perplexity(model, ids, seq_len=seq_len, stride=stride, return_nll=True)
    ref_ppl, ref_nll, ref_count = _direct(model, ids, seq_len, stride)
    assert count == ref_count
    assert nll == pytest.approx(ref_nll, rel=1e-12)
    assert ppl == pytest.approx(ref_ppl, rel=1e-12)
    # overlapping windows score every token but the first; disjoint ones skip each window's first
    assert count == (len(ids) - 1 if stride < seq_len else len(ids) - math.ceil(len(ids) / seq_len))


def test_sliding_window_gives_full_context():
    """The bigram model's prediction of token t reads tokens t-1 and t-2. Windows of 3 with
    stride 1 give every scored token that context: the NLL equals one pass over the whole
    sequence. Disjoint windows of 3 cut the context at every window start and score differently."""
    model = Bigram()
    ids = torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(4))
    _, nll_ctx, n_ctx = perplexity(model, ids, seq_len=3, stride=1, return_nll=True)
    assert n_ctx == 63
    with torch.no_grad():
        logits = model(ids[None])[0, :-1].double()
    assert nll_ctx == pytest.approx(float(F.cross_entropy(logits, ids[1:], reduction="sum")), rel=1e-12)
    # disjoint windows lose the context at each window start: a different (larger-context-free) sum
    _, nll_cut, _ = perplexity(model, ids, seq_len=3, stride=3, return_nll=True)
    assert abs(nll_cut - nll_ctx) > 1e-3


def test_perplexity_of_hf_model_matches_its_own_loss(lm):
    model, _, held_out = lm
    ids = held_out[:SEQ]
    ppl = perplexity(model, ids, seq_len=SEQ)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


@pytest.mark.parametrize("kwargs,err", [
    (dict(token_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError),
    (dict(token_ids=torch.zeros(5)), TypeError),
    (dict(token_ids=torch.zeros(1, dtype=torch.long)), ValueError),
    (dict(token_ids=torch.zeros(9, dtype=torch.long), seq_len=4, stride=5), ValueError),
    (dict(token_ids=torch.zeros(9, dtype=torch.long), seq_len=1), ValueError),
])
def test_perplexity_bad_input(kwargs, err):
    with pytest.raises(err, match="perplexity"):
        perplexity(Bigram(), **kwargs)


# ---------------------------------------------------------------- low-bit evidence


def _rtn(model, bits):
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if type(mod) is nn.Linear and name != "lm_head":
            with torch.no_grad():
                mod.weight.copy_(C.fake_quant_reference(mod.weight, bits, True, 128))
    return m


@pytest.fixture(scope="module")
def ppl(lm):
    """method -> perplexity on held-out text, through ts.quantize with packed layers; INT3 is
    simulated (quantized-dequantized float weights) if the format table has no int3."""
    model, calib, held_out = lm

    def run(m):
        return perplexity(m, held_out, seq_len=SEQ)

    out = {"fp32": run(model)}
    for bits in (4, 3):
        if bits == 3 and "int3" not in ts.FORMATS:
            out["rtn3"] = run(_rtn(model, 3))
            for algo, fn in (("awq", awq.quantize_awq), ("gptq", gptq.quantize_gptq)):
                q = copy.deepcopy(model)
                fn(q, WeightSpec(3, True, 128, simulate=True), make_forward_loop(calib, progress=False),
                   progress=False)
                out[f"{algo}3"] = run(q)
            continue
        q = copy.deepcopy(model)
        ts.quantize(q, ts.IntWeightOnly(bits=bits, group_size=128), progress=False)
        out[f"rtn{bits}"] = run(q)
        for algo in ("awq", "gptq"):
            q = copy.deepcopy(model)
            report = ts.quantize(q, ts.IntWeightOnly(bits=bits, group_size=128, algorithm=algo),
                                 calib_data=calib, progress=False)
            linears = [c for c in report.changed if c.module_type == "Linear"]  # + the embedding table
            assert len(linears) == 21  # 3 blocks x 7 Linear layers; lm_head stays fp32
            assert sum(isinstance(m, ts.WeightOnlyLinear) for m in q.modules()) == 21
            out[f"{algo}{bits}"] = run(q)
    return out


@pytest.mark.parametrize("bits", [4, 3])
def test_packed_rtn_equals_plain_pytorch_rtn(lm, ppl, bits):
    assert run_ppl(lm, _rtn(lm[0], bits)) == pytest.approx(ppl[f"rtn{bits}"], rel=1e-4)


def run_ppl(lm, model):
    return perplexity(model, lm[2], seq_len=SEQ)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("algo", ["awq", "gptq"])
def test_calibrated_beats_round_to_nearest(ppl, algo, bits):
    base = ppl["fp32"]
    rtn, ours = ppl[f"rtn{bits}"] - base, ppl[f"{algo}{bits}"] - base
    print(f"INT{bits} g128 perplexity increase: rtn {rtn:.4f}, {algo} {ours:.4f} (fp32 {base:.4f})")
    assert rtn > 0
    assert ours < rtn, f"{algo} INT{bits}: +{ours:.4f} vs rtn +{rtn:.4f}"
