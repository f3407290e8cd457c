"""Weights loaded into a compressed model under torch.inference_mode reach its kernels: the
layers' packed copies and prepared call arguments are keyed by tensor address and in-place
version, and an inference tensor rewritten in place there keeps both, so loading a state
dict drops them (forget_derived)."""
import pytest
import torch
from torch import nn

import tensorslim as ts
from compressed_kinds import IN, KINDS, build


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_load_state_dict_under_inference_mode_reaches_the_kernels(kind):
    b = build(kind, seed=1)
    x = torch.randn(17, IN)
    with torch.inference_mode():
        want = b(x)
        m = build(kind, seed=0)  # its buffers: inference tensors
        before = m(x)  # packs and prepares for seed 0's weights
        m.load_state_dict(b.state_dict())
        assert torch.equal(m(x), want), kind
    assert not torch.equal(before, want)


def test_int8_conv_reloaded_under_inference_mode_follows_its_new_weights(tmp_path):
    def conv(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
        ts.quantize(model, ts.W8A8(smoothquant=False), calib_data=[torch.randn(2, 8, 12, 12)], progress=False)
        assert isinstance(model[0], ts.nn.Int8Conv2d)
        return model

    a, b = conv(0), conv(1)
    ts.save(a, tmp_path / "a.safetensors")
    ts.save(b, tmp_path / "b.safetensors")
    x = torch.randn(2, 8, 12, 12)
    with torch.inference_mode():
        want = b(x)
        torch.manual_seed(2)
        m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
        ts.load(m, tmp_path / "a.safetensors")
        assert torch.equal(m(x), a(x))
        ts.load(m, tmp_path / "b.safetensors")
        assert torch.equal(m(x), want)
