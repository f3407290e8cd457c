"""GPTQ fitting the float model's outputs (GPTQ(fit_float_outputs=True)): the least-squares
refit of each weight, the pairing of float and quantized inputs, and the pipeline's result
against plain GPTQ on a model whose later blocks inherit the earlier blocks' errors."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.quantization import gptq
from tensorslim.quantization.blockwise import FloatReference

GEN = torch.Generator().manual_seed(0)


def gram(a, b):
    return 2 * a.double().T @ b.double() / a.shape[0]


def test_refit_keeps_the_weight_when_inputs_are_the_float_ones():
    x = torch.randn(512, 64, generator=GEN)
    w = torch.randn(32, 64, generator=GEN)
    out = gptq.fit_float_outputs(w, gram(x, x), gram(x, x))
    torch.testing.assert_close(out, w, rtol=1e-5, atol=1e-5)


def test_refit_is_the_least_squares_solution():
    """argmin ||X_f W^T - X W'^T||: compared with float64 lstsq (ridge negligible)."""
    x = torch.randn(2000, 48, generator=GEN, dtype=torch.float64)
    x_float = x + 0.2 * torch.randn(2000, 48, generator=GEN, dtype=torch.float64)
    w = torch.randn(24, 48, generator=GEN, dtype=torch.float64)
    out = gptq.fit_float_outputs(w, gram(x, x), gram(x_float, x), lam=1e-12)
    expected = torch.linalg.lstsq(x, x_float @ w.T).solution.T
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-7)


def test_refit_ridge_keeps_unseen_directions():
    """Fewer tokens than channels: directions no token spans keep W's values, not zeros."""
    x = torch.zeros(40, 64)
    x[:, :32] = torch.randn(40, 32, generator=GEN)
    w = torch.randn(8, 64, generator=GEN)
    out = gptq.fit_float_outputs(w, gram(x, x), gram(x + 0.1, x))
    torch.testing.assert_close(out[:, 32:], w[:, 32:], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


class Block(nn.Module):
    def __init__(self, width=128, hidden=256):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[Block() for _ in range(4)])
    mix = torch.randn(128, 128) * 0.3 + torch.eye(128)
    data = [torch.randn(256, 128) @ mix for _ in range(9)]
    return model, data[:8], data[8]


def output_error(model, ref, x):
    with torch.no_grad():
        return float((model(x) - ref(x)).pow(2).mean() / ref(x).pow(2).mean())


@pytest.mark.parametrize("bits", [3, 4])
def test_fitting_the_float_outputs_beats_plain_gptq(bits):
    """Held-out relative output error of the whole model: plain GPTQ (one pass, and true
    sequential) against the float-fit variant, same codes budget (INT3 / INT4 g32)."""
    model, calib, held_out = model_and_data()
    errors = {}
    for name, kwargs in [("plain", {}), ("sequential", dict(sequential=True)), ("fit", dict(fit_float=True))]:
        q = copy.deepcopy(model)
        gptq.quantize_gptq(q, gptq.WeightSpec(bits, False, 32), ts.quantization.calibrate.make_forward_loop(
            calib, progress=False), progress=False, **kwargs)
        errors[name] = output_error(q, model, held_out)
    assert errors["fit"] < 0.9 * min(errors["plain"], errors["sequential"]), errors


def test_config_reports_float_fit_and_keeps_no_copy():
    model, calib, _ = model_and_data(seed=1)
    n_modules = len(list(model.modules()))
    report = ts.quantize(model, ts.GPTQ(bits=4, group_size=32, fit_float_outputs=True), calib_data=calib,
                         progress=False)
    notes = [c.format for c in report.changed]
    assert len(notes) == 8 and all("gptq float-fit" in n for n in notes), notes
    assert len(list(model.modules())) == n_modules  # the float copies of the blocks are gone
    assert ts.GPTQ.from_dict(ts.GPTQ(fit_float_outputs=True).to_dict()).fit_float_outputs


def test_unpaired_calls_get_no_refit():
    """A float reference whose batches do not line up with the pipeline's (other token
    counts) gives no cross term, so that layer falls back to plain GPTQ."""
    block = Block()
    inputs = [((torch.randn(16, 128, generator=GEN),), {})]
    reference = FloatReference(copy.deepcopy(block), [((torch.randn(8, 128, generator=GEN),), {})])
    stats = gptq.accumulate_hessians(block, {"up": block.up, "down": block.down}, inputs, reference)
    assert set(stats.hessians) == {"up", "down"} and stats.crosses == {}
    paired = FloatReference(copy.deepcopy(block), inputs)
    stats = gptq.accumulate_hessians(block, {"up": block.up, "down": block.down}, inputs, paired)
    # same block, same inputs: equal up to H's float32 products (gram.py)
    torch.testing.assert_close(stats.crosses["up"], stats.hessians["up"], rtol=1e-5, atol=1e-6)
