"""Feeding calibration data: calib_data (tensors, tuples, dicts) or forward_loop, and the errors."""
import pytest
import torch
from torch import nn

from tensorslim.quantization.calibrate import (call_model, make_forward_loop,
                                               require_forward_loop)


class Recorder(nn.Module):
    """Remembers how it was called; two inputs, the second optional."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.calls = []

    def forward(self, x, scale=None):
        self.calls.append((tuple(x.shape), scale))
        return self.lin(x) * (1.0 if scale is None else scale)


def test_batches_of_every_kind_reach_the_model():
    model = Recorder()
    x = torch.randn(3, 8)
    data = [x, (x, 2.0), [x], {"x": x, "scale": 3.0}]
    loop = make_forward_loop(data, progress=False)
    loop(model)
    assert model.calls == [((3, 8), None), ((3, 8), 2.0), ((3, 8), None), ((3, 8), 3.0)]
    assert torch.equal(call_model(model, {"x": x}), model.lin(x))


def test_forward_loop_is_used_as_given():
    seen = []
    loop = make_forward_loop(forward_loop=lambda m: seen.append(m), progress=False)
    model = Recorder()
    loop(model)
    assert seen == [model]
    assert make_forward_loop(None, None) is None


def test_generators_and_dataloaders_work():
    model = Recorder()
    make_forward_loop((torch.randn(2, 8) for _ in range(3)), progress=False)(model)
    assert len(model.calls) == 3
    loader = torch.utils.data.DataLoader(torch.randn(10, 8), batch_size=4)
    make_forward_loop(loader, progress=False)(model)
    assert [c[0] for c in model.calls[3:]] == [(4, 8), (4, 8), (2, 8)]


def test_bad_calibration_input_is_named():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="not both"):
        make_forward_loop([x], lambda m: None)
    with pytest.raises(TypeError, match="forward_loop must be callable"):
        make_forward_loop(forward_loop=42)
    with pytest.raises(TypeError, match="not a single tensor"):
        make_forward_loop(x)
    with pytest.raises(TypeError, match="must be iterable"):
        make_forward_loop(3.5)
    with pytest.raises(ValueError, match="empty"):
        make_forward_loop([], progress=False)(Recorder())
    with pytest.raises(TypeError, match="got str"):
        make_forward_loop(["text"], progress=False)(Recorder())
    with pytest.raises(ValueError, match="batch 1 does not run through the model"):
        make_forward_loop([x, torch.randn(3, 5)], progress=False)(Recorder())
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        require_forward_loop(None, "GPTQ")
