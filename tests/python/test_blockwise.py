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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    linears = [c for c in report.changed if c.module_type == "Linear"]  # the embedding table: INT8 rows
    assert len(linears) == 21 and all(algorithm in c.format for c in linears)
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


# ---------------------------------------------------------------- layers the data never reaches


class Gated(nn.Module):
    """fc always runs; rare only on batches whose mean exceeds `threshold` (a branch the
    calibration data may never take, like an expert no token is routed to)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.fc, self.rare = nn.Linear(128, 128), nn.Linear(128, 128)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if float(x.mean()) > self.threshold:
            h = h + self.rare(h)
        return x + h


ALWAYS, NEVER = -float("inf"), float("inf")


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
@pytest.mark.parametrize("thresholds,unreached", [((NEVER, ALWAYS), {"0.rare"}), ((ALWAYS, NEVER), {"1.rare"}),
                                                  ((NEVER, NEVER), {"0.rare", "1.rare"})])
def test_layers_never_reached_are_skipped_with_a_warning(algorithm, thresholds, unreached):
    torch.manual_seed(0)
    model = nn.Sequential(*(Gated(t) for t in thresholds))
    before = copy.deepcopy(model.state_dict())
    calib = [torch.randn(4, 128) for _ in range(3)]
    cfg = ts.Int4WeightOnly(algorithm=algorithm, unreached="skip")
    with pytest.warns(RuntimeWarning, match="never ran on the calibration data and stay float") as caught:
        report = ts.quantize(model, cfg, calib_data=calib, progress=False)
    message = next(str(w.message) for w in caught if "never ran" in str(w.message))
    assert all(repr(n) in message for n in unreached) and algorithm.upper() in message
    everything = {"0.fc", "0.rare", "1.fc", "1.rare"}
    assert {c.name for c in report.changed} == everything - unreached
    assert all(algorithm in c.format for c in report.changed)
    skipped = {c.name: c.reason for c in report.skipped}
    assert set(skipped) == unreached and all("never ran" in r for r in skipped.values())
    for name in unreached:  # left exactly as it was
        assert type(model.get_submodule(name)) is nn.Linear
        assert torch.equal(model.get_submodule(name).weight, before[f"{name}.weight"])
    summary = ts.summary(model)
    assert {c.name for c in summary.skipped} == unreached
    assert {c.name for c in summary.changed} == everything - unreached
    assert model(calib[0]).isfinite().all()


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
@pytest.mark.parametrize("thresholds,unreached", [((NEVER, ALWAYS), {"0.rare"}), ((NEVER, NEVER), {"0.rare", "1.rare"})])
def test_layers_never_reached_fall_back_to_round_to_nearest(algorithm, thresholds, unreached):
    """The default unreached="fallback": a layer no batch runs is quantized as round to nearest
    would (the same codes and scales as an RTN call on the float model), noted in its row; the
    layers that ran are calibrated as before (the same codes as with unreached="skip")."""
    torch.manual_seed(0)
    model = nn.Sequential(*(Gated(t) for t in thresholds))
    rtn, skip = copy.deepcopy(model), copy.deepcopy(model)
    calib = [torch.randn(4, 128) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match=f"{algorithm.upper()}: .*got the data-free fallback") as caught:
        report = ts.quantize(model, ts.Int4WeightOnly(algorithm=algorithm), calib_data=calib, progress=False)
    assert all(repr(n) in str(caught[0].message) for n in unreached)
    ts.quantize(rtn, ts.Int4WeightOnly(), progress=False)
    with pytest.warns(RuntimeWarning):
        ts.quantize(skip, ts.Int4WeightOnly(algorithm=algorithm, unreached="skip"), calib_data=calib, progress=False)
    rows = {c.name: c.format for c in report.changes}
    assert not report.skipped and len(rows) == 4
    for name, fmt in rows.items():
        layer = model.get_submodule(name)
        twin = (rtn if name in unreached else skip).get_submodule(name)
        assert fmt.endswith("rtn (never ran on the calibration data)") == (name in unreached), fmt
        assert torch.equal(layer.qweight, twin.qweight) and torch.equal(layer.scales, twin.scales)
    assert {c.name for c in ts.summary(model).changed} == set(rows)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_layers_never_reached_raise_before_anything_changes(algorithm):
    """unreached="error": one float pass finds every layer no batch runs, in any block, and the
    error names them all with the exclude list; nothing was quantized. Excluding them works."""
    torch.manual_seed(0)
    model = nn.Sequential(Gated(NEVER), Gated(ALWAYS), Gated(NEVER))
    before = copy.deepcopy(model.state_dict())
    calib = [torch.randn(4, 128) for _ in range(2)]
    cfg = ts.Int4WeightOnly(algorithm=algorithm, unreached="error")
    with pytest.raises(ValueError, match=rf"{algorithm}: layers '0.rare', '2.rare': the calibration data "
                                         r"never reached them.*exclude=\['0.rare', '2.rare'\]"):
        ts.quantize(model, cfg, calib_data=calib, progress=False)
    assert all(type(model.get_submodule(f"{i}.{n}")) is nn.Linear for i in range(3) for n in ("fc", "rare"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cfg = ts.Int4WeightOnly(algorithm=algorithm, unreached="error", exclude=["0.rare", "2.rare"])
    report = ts.quantize(model, cfg, calib_data=calib, progress=False)
    assert {c.name for c in report.changed} == {"0.fc", "1.fc", "1.rare", "2.fc"}


class _TwoTowers(nn.Module):
    """A vision stack the calibration data never enters (text-only batches) and a text stack."""

    def __init__(self):
        super().__init__()
        self.vision = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(2))
        self.text = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(2))

    def forward(self, x, image=None):
        if image is not None:
            for blk in self.vision:
                image = blk(image)
            x = x + image
        for blk in self.text:
            x = blk(x)
        return x


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_a_stack_the_data_never_enters(algorithm):
    """Text-only calibration of a model with a vision stack: fallback rounds the vision layers
    to nearest, skip leaves them float, error names them; the text stack is calibrated."""
    torch.manual_seed(0)
    calib = [torch.randn(4, 64) for _ in range(2)]
    model, rtn = _TwoTowers(), _TwoTowers()
    rtn.load_state_dict(model.state_dict())
    with pytest.warns(RuntimeWarning, match=r"2 layer\(s\) never ran.*'vision.0.0', 'vision.1.0'"):
        report = ts.quantize(model, ts.Int4WeightOnly(algorithm=algorithm), calib_data=calib, progress=False)
    ts.quantize(rtn, ts.Int4WeightOnly(), progress=False)
    rows = {c.name: c.format for c in report.changes}
    for i in range(2):
        assert rows[f"vision.{i}.0"].endswith("rtn (never ran on the calibration data)")
        assert torch.equal(model.vision[i][0].qweight, rtn.vision[i][0].qweight)
        assert algorithm in rows[f"text.{i}.0"]
    skip = _TwoTowers()
    with pytest.warns(RuntimeWarning, match="stay float"):
        ts.quantize(skip, ts.Int4WeightOnly(algorithm=algorithm, unreached="skip"), calib_data=calib, progress=False)
    assert type(skip.vision[0][0]) is nn.Linear and type(skip.text[0][0]) is not nn.Linear
    with pytest.raises(ValueError, match=r"layers 'vision.0.0', 'vision.1.0': the calibration data never reached"):
        ts.quantize(_TwoTowers(), ts.Int4WeightOnly(algorithm=algorithm, unreached="error"), calib_data=calib,
                    progress=False)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_layer_reached_on_some_batches_is_calibrated_on_those(algorithm):
    """rare runs on the second batch only: it is quantized exactly as if that batch were the
    whole calibration set (its statistics come from the batches it ran on)."""
    torch.manual_seed(1)
    model = nn.Sequential(Gated(threshold=5.0))
    quiet, loud = torch.randn(4, 128), torch.randn(4, 128) + 10
    both, loud_only = copy.deepcopy(model), copy.deepcopy(model)
    cfg = ts.Int4WeightOnly(algorithm=algorithm, exclude=("*.fc",))
    for m, calib in ((both, [quiet, loud]), (loud_only, [loud])):
        report = ts.quantize(m, cfg, calib_data=calib, progress=False)
        assert [c.name for c in report.changed] == ["0.rare"]
    a, b = both[0].rare, loud_only[0].rare
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    if algorithm == "awq":
        assert (a.input_scale is None) == (b.input_scale is None)
        assert a.input_scale is None or torch.equal(a.input_scale, b.input_scale)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_no_layer_reached_is_an_error(algorithm):
    torch.manual_seed(2)
    model = nn.Sequential(Gated(NEVER), Gated(NEVER))
    before = copy.deepcopy(model.state_dict())
    cfg = ts.Int4WeightOnly(algorithm=algorithm, exclude=("*.fc",))  # only the rare layers
    with pytest.raises(ValueError, match=f"{algorithm}: none of the 2 layers to calibrate ran"):
        ts.quantize(model, cfg, calib_data=[torch.randn(4, 128)], progress=False)
    assert not any(isinstance(m, ts.WeightOnlyLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreached_check_costs_one_batch_when_everything_runs():
    """The pipeline's reach check stops as soon as every target has run."""
    block = Gated(ALWAYS)
    calls = []
    block.register_forward_pre_hook(lambda m, a: calls.append(1))
    inputs = [((torch.randn(2, 128),), {}) for _ in range(4)]
    targets = {"fc": block.fc, "rare": block.rare}
    assert blockwise.reached_targets(block, targets, inputs) == {"fc", "rare"} and len(calls) == 1
    block.threshold = NEVER
    assert blockwise.reached_targets(block, targets, inputs) == {"fc"} and len(calls) == 5


def test_awq_block_forwards_once_per_batch_for_statistics_and_next_inputs():
    """AWQ's statistics pass also gives the next block's (float) inputs and the fold checks'
    references: a block that is not the last runs each calibration batch once, plus the reach
    check's one batch and one batch for its folds checked together (separately, it was
    twice, plus two)."""
    model = tiny_llama()
    calib = [torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    ts.quantize(model, ts.Int4WeightOnly(group_size=64, algorithm="awq"), calib_data=calib, progress=False)
    # 6 while capturing the inputs (the capture stops there), 1 reach check, 6 statistics,
    # one fold check for all 4 groups (each folds into its first candidate)
    assert len(calls) <= 6 + 1 + 6 + 1
