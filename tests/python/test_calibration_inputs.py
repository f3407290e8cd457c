"""Calibration as users call it: one-shot generators, models in training mode or with an
instance forward, NaN activations, gradient-free Taylor data; each verb leaves the model's
modes and forward as they were (found by probing, twenty-third session)."""
import pytest
import torch
from torch import nn

import tensorslim as ts


def _mlp(train=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    return model.train(train)


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 32, generator=g) for _ in range(n)]


@pytest.mark.parametrize("verb, config", [
    (ts.quantize, ts.Int4WeightOnly(group_size=32, algorithm="gptq")),
    (ts.quantize, ts.W8A8(observer="mse")),  # calibrates, then runs the data again
    (ts.prune, ts.ChannelPrune(ratio=0.5, importance="taylor")),  # traces on batch 0, then gradients
])
def test_a_generator_calibrates_as_its_list_does(verb, config):
    """A generator runs once: a second pass saw nothing ('calib_data is empty'), and Taylor
    traced on batch 0 and lost it for the gradients."""
    from_list, from_gen = _mlp(), _mlp()
    verb(from_list, config, calib_data=_batches(), progress=False)
    verb(from_gen, config, calib_data=(b for b in _batches()), progress=False)
    x = torch.randn(4, 32)
    torch.testing.assert_close(from_gen(x), from_list(x), rtol=0, atol=0)


def test_taylor_without_gradients_is_an_error_and_modes_stay():
    model = _mlp(train=True)
    model[1].eval()
    modes = [m.training for m in model.modules()]
    for kwargs in ({"calib_data": [], "example_inputs": torch.randn(2, 32)},
                   {"forward_loop": lambda m: None, "example_inputs": torch.randn(2, 32)}):
        with pytest.raises(ValueError, match="got no gradients"):  # pruned by index order before
            ts.prune(model, ts.ChannelPrune(ratio=0.5, importance="taylor"), progress=False, **kwargs)
        assert model[0].out_features == 64
    ts.prune(model, ts.ChannelPrune(ratio=0.5, importance="taylor"), calib_data=_batches(), progress=False)
    assert [m.training for m in model.modules()] == modes  # model.train(training) flattened them


def test_smoothquant_runs_a_training_model_as_inference_does():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Linear(64, 64), nn.LayerNorm(64),
                             nn.Linear(64, 8))

    model, reference = make().train(), make().eval()
    stats = model[1].running_mean.clone()
    report = ts.quantize(model, ts.W8A8(skip_output_head=False), calib_data=_batches(), progress=False)
    want = ts.quantize(reference, ts.W8A8(skip_output_head=False), calib_data=_batches(), progress=False)
    assert torch.equal(model[1].running_mean, stats) and int(model[1].num_batches_tracked) == 0
    assert model.training and [c.format for c in report.changed] == [c.format for c in want.changed]
    assert "folded(3)" in report.changed[-1].format


@pytest.mark.parametrize("config", [ts.Int4WeightOnly(group_size=32, algorithm="gptq"), ts.NM(2, 4, method="wanda")])
def test_an_instance_forward_stays(config):
    model = _mlp()
    model.forward = lambda x: 2 * type(model).forward(model, x)  # a wrapper (accelerate's kind)
    (ts.sparsify if isinstance(config, ts.NM) else ts.quantize)(model, config, calib_data=_batches(), progress=False)
    x = torch.randn(3, 32)
    assert "forward" in model.__dict__  # deleted by the block capture before
    torch.testing.assert_close(model(x), 2 * type(model).forward(model, x))


def test_wanda_refuses_nan_activations():
    batches = _batches()
    batches[1][2, 5] = float("nan")
    model = _mlp()
    with pytest.raises(ValueError, match="NaN or Inf"):  # ranked silently before
        ts.sparsify(model, ts.NM(2, 4, method="wanda"), calib_data=batches, progress=False)
    assert all(type(m) is nn.Linear for m in model if m.__class__.__name__.endswith("Linear"))


def test_replacements_take_the_replaced_layer_mode():
    model = _mlp().eval()
    ts.quantize(model, ts.W8A8(), calib_data=_batches(), progress=False)
    assert not any(m.training for m in model.modules())


def test_a_failing_linear_pass_undoes_the_convs():
    """W8A8 swaps the convs in (BatchNorm folded, a fused forward on the root) before it
    calibrates the linears: a linear that fails left them swapped in."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc, self.unused = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    before, out = dict(model.named_modules()), model(x)
    with pytest.raises(ValueError, match="'unused'.*never reached"):
        ts.quantize(model, ts.W8A8(skip_output_head=False, unreached="error"), calib_data=[x], progress=False)
    assert dict(model.named_modules()) == before and "forward" not in model.__dict__
    assert torch.equal(model(x), out) and not hasattr(model, "_tensorslim_skipped")


@pytest.mark.parametrize("verb, config", [
    (ts.quantize, ts.Int4WeightOnly(group_size=32, algorithm="awq")),
    (ts.factorize, ts.SVD(ratio=0.5, method="svd_llm")),
])
def test_compressed_under_inference_mode_then_trained(verb, config):
    """AWQ's folded weights and the factors were inference tensors when the verb ran under
    torch.inference_mode: every later forward with gradients raised."""
    model = _mlp()
    with torch.inference_mode():
        verb(model, config, calib_data=_batches(), progress=False)
    assert not any(p.is_inference() for p in model.parameters())
    model(torch.randn(2, 32, requires_grad=True)).sum().backward()


def test_blockwise_errors_name_the_block_and_layer():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"gptq: block '2': gptq_quantize: w contains NaN"):
        ts.quantize(model, ts.Int4WeightOnly(group_size=32, algorithm="gptq"), calib_data=_batches(), progress=False)
    with pytest.raises(ValueError, match=r"layer '2'"):
        ts.sparsify(model, ts.NM(2, 4, method="sparsegpt"), calib_data=_batches(), progress=False)
