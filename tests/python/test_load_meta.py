"""ts.load into a model built with ts.empty_parameters(): parameters on the meta device (no
float weights allocated), buffers computed; the loaded model must equal one loaded the usual way."""
import pytest
import torch
from torch import nn

import tensorslim as ts


class _Net(nn.Module):
    """Float layers left uncompressed (the embedding-like first layer is excluded, a norm), a
    tied pair, a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.BatchNorm1d(32))
        self.out = nn.Linear(32, 16, bias=False)
        self.back = nn.Linear(16, 32, bias=False)
        self.back.weight = self.inp.weight  # tied ([32, 16] both)
        self.register_buffer("table", torch.arange(32, dtype=torch.float32) / 32, persistent=False)

    def forward(self, x):
        h = self.body(self.inp(x) + self.table)
        return self.out(h) + self.back(self.out(h)).sum(-1, keepdim=True)


def _saved(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():  # statistics a fresh build does not have
        model.body[3].running_mean.uniform_(-1, 1)
    ts.quantize(model, ts.Int8WeightOnly(exclude=["inp", "back"]), progress=False)
    path = tmp_path / "net.slim.safetensors"
    ts.save(model, path)
    return model, path


def test_empty_parameters_load_equals_a_normal_load(tmp_path):
    model, path = _saved(tmp_path)
    x = torch.randn(5, 16)
    with ts.empty_parameters():
        skeleton = _Net().eval()
    assert all(p.is_meta for p in skeleton.parameters()) and not skeleton.table.is_meta
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # the patch ends with the block
    ts.load(skeleton, path)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    assert skeleton.back.weight is skeleton.inp.weight  # still one parameter
    assert torch.equal(skeleton.body[3].running_mean, model.body[3].running_mean)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))
    skeleton.train()
    skeleton(x).sum().backward()  # the float layers' parameters train
    assert skeleton.inp.weight.grad is not None


def test_a_file_missing_a_meta_parameter_leaves_the_model_as_it_was(tmp_path):
    model, path = _saved(tmp_path)
    with ts.empty_parameters():
        other = _Net()
        other.extra = nn.Linear(2, 2)  # in no file
    with pytest.raises(ValueError, match="'extra.weight' is on the meta device and the file holds no tensor"):
        ts.load(other, path)
    assert all(p.is_meta for p in other.parameters())
    assert type(other.body[0]) is nn.Linear and other.back.weight is other.inp.weight


def test_meta_buffers_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    with torch.device("meta"):
        model = _Net()
    with pytest.raises(ValueError, match="buffer 'table' is on the meta device"):
        ts.load(model, path)


def test_masked_file_into_an_empty_parameters_model(tmp_path):
    """Masks ts.load attaches before the weights are taken from the file live on the CPU."""
    torch.manual_seed(0)
    model = _Net().eval()
    ts.prune(model, ts.Magnitude(sparsity=0.5, exclude=["back"]), progress=False)
    path = tmp_path / "masked.safetensors"
    ts.save(model, path)
    with ts.empty_parameters():
        skeleton = _Net().eval()
    ts.load(skeleton, path)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))
    skeleton.train()
    skeleton(x).sum().backward()
    ts.save(skeleton, tmp_path / "again.safetensors")


def test_lazy_and_subclassed_parameters_stay_as_built():
    class Tagged(nn.Parameter):
        pass

    with ts.empty_parameters():
        lazy = nn.LazyLinear(4)
        holder = nn.Module()
        holder.p = Tagged(torch.ones(3))
    assert isinstance(lazy.weight, nn.parameter.UninitializedParameter)
    assert type(holder.p) is Tagged and not holder.p.is_meta


@pytest.mark.parametrize("config", [ts.Int4WeightOnly(group_size=32), ts.Int8Dynamic(), ts.NM(2, 4)],
                         ids=["int4", "int8dyn", "2:4"])
def test_loaded_compressed_modules_hold_the_files_tensors_aligned(tmp_path, config):
    """ts.load builds the compressed modules on the meta device and hands them the file's
    tensors (no empty copies filled): every tensor ends on the CPU, 64-byte aligned (safetensors'
    own allocations are not always; the kernels' packing assumes torch's), equal to the saved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40))
    verb = ts.sparsify if isinstance(config, ts.NM) else ts.quantize
    verb(model, config, progress=False)
    ts.save(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    fresh = ts.load(nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40)), tmp_path / "m.safetensors")
    saved = model.state_dict()
    for key, t in fresh.state_dict().items():
        assert t.device.type == "cpu" and t.data_ptr() % 64 == 0, key
        assert t.dtype == saved[key].dtype and torch.equal(t, saved[key]), key
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), model(x))
