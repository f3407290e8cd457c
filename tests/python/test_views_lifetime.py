"""A tensor made for a native call (x.contiguous(), x.float()) lives through the call.

Views used to carry only the data pointer, so `pack_int8_weight(w.t())` let its
`.contiguous()` temporary be freed before C++ read it: a crash for large weights, wrong
packed bytes for small ones."""
import gc

import pytest
import torch

from tensorslim import _views, ops


def test_view_keeps_its_tensor_alive():
    v = _views.view(torch.arange(1000, dtype=torch.float32).add(1.0), "x")
    gc.collect()
    assert len(v) == 8  # the core reads the first 7 fields; the 8th is the tensor
    assert v[7].data_ptr() == v[0]
    assert float(v[7][999]) == 1000.0


@pytest.mark.parametrize("shape", [(64, 48), (2048, 4096)])
def test_pack_of_a_transposed_weight_equals_pack_of_its_copy(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, shape, generator=g, dtype=torch.int16).to(torch.int8)
    want = ops.int8.pack_int8_weight(w.t().contiguous())
    got = ops.int8.pack_int8_weight(w.t())  # the temporary .contiguous() happens inside
    if want is None:  # oneDNN has no exact packed layout on this CPU: nothing to pack
        assert got is None
        return
    # Allocations between the pack calls would reuse freed memory if the view let it go.
    scratch = [torch.full(shape, 7, dtype=torch.int8) for _ in range(3)]
    assert torch.equal(got, want)
    del scratch


def test_views_reject_what_the_core_cannot_read():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        _views.view([1, 2, 3], "x")
    with pytest.raises(TypeError, match="meta"):
        _views.view(torch.empty(3, device="meta"), "x")
    with pytest.raises(TypeError, match="float64"):
        _views.view(torch.zeros(3, dtype=torch.float64), "x")
