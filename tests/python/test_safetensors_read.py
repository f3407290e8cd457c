"""safetensors_read.read_tensors: every dtype a file may hold, read into tensors of their own
(aligned, not views of the mapped file), equal to safetensors' own reader; a model loaded by
ts.load keeps working when its file is rewritten in place afterwards."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tensorslim as ts
from tensorslim.safetensors_read import read_tensors


def test_every_dtype_equals_safetensors_own_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(4, generator=g).double(),
        "i8": torch.randint(-128, 128, (9,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 256, (3, 3), dtype=torch.uint8, generator=g),
        "i32": torch.randint(-99, 99, (5,), dtype=torch.int32, generator=g),
        "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(5, generator=g).to(torch.float8_e4m3fn), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4), "u16": torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    got, want = read_tensors(path), load_file(str(path))
    assert got.keys() == want.keys() == tensors.keys()
    for k, t in got.items():
        assert t.dtype == want[k].dtype and t.shape == want[k].shape, k
        assert torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t,
                           want[k].view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else want[k]), k
        assert t.numel() == 0 or (t.data_ptr() % 64 == 0 and t.untyped_storage().nbytes() == t.nbytes), k


def test_a_truncated_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=str(path)):
        ts.load(model, path)


def test_a_loaded_model_survives_its_file_rewritten_in_place(tmp_path):
    """Views of the mapped file (safetensors' get_tensor) would change, or crash the process on a
    truncated file, when the file is rewritten in place under the loaded model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    ts.quantize(model, ts.Int8WeightOnly(exclude=["0"]), progress=False)
    path = tmp_path / "m.safetensors"
    ts.save(model, path)
    with ts.empty_parameters():
        fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    ts.load(fresh, path)
    x = torch.randn(3, 32)
    want = model(x)
    with open(path, "r+b") as f:  # in place: same inode, zeroed, then cut short
        size = f.seek(0, 2)
        f.seek(0)
        f.write(b"\0" * size)
        f.truncate(16)
    assert torch.equal(fresh(x), want)
