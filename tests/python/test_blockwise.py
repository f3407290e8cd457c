"""The block-by-block pipeline: which blocks, what the first block receives (keyword inputs
included), that later blocks see earlier blocks' outputs, and that a failure leaves the
model exactly as it was."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.quantization import blockwise, gptq
from tensorslim.quantization.blockwise import WeightSpec
from tensorslim.quantization.calibrate import make_forward_loop

transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64, use_cache=True)
    return transformers.LlamaForCausalLM(cfg).eval()


class Net(nn.Module):
    """Not a Sequential and no ModuleList: calibrated as one block."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(128, 128), nn.Linear(128, 128)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_find_blocks():
    names = [n for n, _ in blockwise.find_blocks(tiny_llama())]
    assert names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    assert [n for n, _ in blockwise.find_blocks(seq)] == ["0", "1", "2"]
    net = Net()
    assert blockwise.find_blocks(net) == [("", net)]


def test_capture_stops_at_the_first_block_and_keeps_keyword_inputs():
    model = tiny_llama()
    calls = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    calib = [torch.randint(0, 64, (2, 12)) for _ in range(3)]
    inputs = blockwise.capture_block_inputs(model, model.model.layers[0],
                                            make_forward_loop(calib, progress=False))
    assert len(inputs) == 3 and not calls  # the rest of the model never ran
    args, kwargs = inputs[0]
    hidden = args[0] if args else kwargs["hidden_states"]
    assert hidden.shape == (2, 12, 128)
    assert torch.equal(hidden, model.model.embed_tokens(calib[0]))
    assert "position_embeddings" in kwargs  # rotary cos/sin travel with the captured inputs
    assert model.config.use_cache is True and "forward" not in vars(model)  # restored


def test_blocks_see_the_previous_blocks_outputs():
    """Running the captured inputs through every block reproduces the full model's states."""
    model = tiny_llama()
    calib = [torch.randint(0, 64, (1, 10))]
    inputs = blockwise.capture_block_inputs(model, model.model.layers[0], make_forward_loop(calib, progress=False))
    for layer in model.model.layers:
        out = blockwise.run_block(layer, inputs[0])
        inputs = [blockwise.next_inputs(inputs[0], out)]
    outs = []
    model.model.layers[2].register_forward_hook(lambda m, a, o: outs.append(blockwise.block_output(o)))
    with torch.no_grad():
        model(calib[0])
    ref = outs[0]
    hidden = inputs[0][0][0] if inputs[0][0] else inputs[0][1]["hidden_states"]
    torch.testing.assert_close(hidden, ref)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_transformer_end_to_end(algorithm):
    model = tiny_llama()
    calib = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    report = ts.quantize(model, ts.Int4WeightOnly(algorithm=algorithm), calib_data=calib, progress=False)
    assert len(report.changed) == 21 and all(algorithm in c.format for c in report.changed)
    assert {c.name for c in report.skipped if c.module_type == "Linear"} == {"lm_head"}
    assert model(calib[0]).logits.isfinite().all()


def test_whole_model_as_one_block():
    model = Net()
    report = ts.quantize(model, ts.Int4WeightOnly(algorithm="gptq"), calib_data=[torch.randn(32, 128)],
                         progress=False)
    assert {c.name for c in report.changed} == {"fc1", "fc2"}
    assert isinstance(model.fc1, ts.WeightOnlyLinear) and isinstance(model.fc2, ts.WeightOnlyLinear)


def test_failure_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    calib = [torch.randint(0, 64, (2, 8))]
    real = gptq.gptq_block(WeightSpec(4, True, 128))
    seen = []

    def failing(spec, *a, **k):
        def step(block, targets, inputs, edits):
            seen.append(block)
            if len(seen) == 3:
                raise ValueError("boom in the last block")
            return real(block, targets, inputs, edits)
        return step

    monkeypatch.setattr(gptq, "gptq_block", failing)
    with pytest.raises(ValueError, match="boom in the last block"):
        ts.quantize(model, ts.Int4WeightOnly(algorithm="gptq"), calib_data=calib, progress=False)
    assert not any(isinstance(m, ts.WeightOnlyLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_awq_failure_undoes_folds(monkeypatch):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    calib = [torch.randint(0, 64, (2, 8))]

    def bad_clip(*a, **k):
        raise ValueError("clip search failed")

    monkeypatch.setattr(ts.ops.calibration, "awq_search_clip", bad_clip)
    with pytest.raises(ValueError, match="clip search failed"):
        ts.quantize(model, ts.Int4WeightOnly(algorithm="awq"), calib_data=calib, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # norms unscaled again


def test_empty_calibration_data():
    with pytest.raises(ValueError, match="empty"):
        ts.quantize(Net(), ts.Int4WeightOnly(algorithm="gptq"), calib_data=[], progress=False)
