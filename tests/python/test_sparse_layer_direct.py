"""The sparse layers' direct call (a float32 CPU input straight to the op's CPU function):
the same bits as the op through its checks, every other input on the general path, and
buffers changed or replaced after a call read anew."""
import pytest
import torch

from tensorslim.nn.sparse_linear import CSRSparseLinear, NMSparseLinear, _SparseLinear
from tensorslim.ops import sparse as S

from test_sparse_ops import close_to_float64, nm_keep

K, N = 40, 24


def make_layer(kind: str, values: str, scale: float = 1.0):
    """A 2:4 or ~70%-sparse CSR layer; scale multiplies the weight (same kept positions)."""
    g = torch.Generator().manual_seed(0)
    w, bias = scale * torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    if kind == "nm":
        return NMSparseLinear.from_dense(w, nm_keep(w, 2, 4), 2, 4, values, bias)
    return CSRSparseLinear.from_dense(w, torch.rand(N, K, generator=g) >= 0.7, values, bias)


def op_result(layer, x: torch.Tensor) -> torch.Tensor:
    """The op through its argument checks (ops.nm_linear / ops.csr_linear), on x as float32."""
    x32 = x.float()
    if isinstance(layer, NMSparseLinear):
        return S.nm_linear(x32, layer.values, layer.indices, layer.scales, layer.bias, layer.n, layer.m, K)
    return S.csr_linear(x32, layer.values, layer.cols, layer.row_ptr, layer.scales, layer.bias, K)


LAYERS = [("nm", "float32"), ("nm", "bfloat16"), ("nm", "int8"), ("nm", "int4"), ("csr", "float32"), ("csr", "int8")]


@pytest.mark.parametrize("kind,values", LAYERS)
@pytest.mark.parametrize("shape", [(1, K), (5, K), (2, 3, K)])
def test_direct_call_is_the_op_bit_for_bit(kind, values, shape, monkeypatch):
    layer = make_layer(kind, values)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))

    def general_path(*args):
        raise AssertionError("a float32 contiguous input took the general path")

    monkeypatch.setattr(_SparseLinear, "_run", general_path)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], N) and y.dtype == torch.float32
    assert torch.equal(y, op_result(layer, x))
    close_to_float64(y, layer.dense_weight(), x, layer.bias, f"{kind} {values}")


@pytest.mark.parametrize("kind,values", LAYERS)
def test_other_inputs_take_the_general_path(kind, values, monkeypatch):
    layer = make_layer(kind, values)
    g = torch.Generator().manual_seed(2)
    strided = torch.randn(4, 2 * K, generator=g)[:, ::2]  # last dimension not contiguous
    half = torch.randn(3, K, generator=g).bfloat16()
    runs = []
    original = _SparseLinear._run
    monkeypatch.setattr(_SparseLinear, "_run", lambda self, x, fn: runs.append(x.dtype) or original(self, x, fn))
    with torch.no_grad():
        y_strided, y_half = layer(strided), layer(half)
    assert runs == [torch.float32, torch.bfloat16]
    assert torch.equal(y_strided, op_result(layer, strided.contiguous()))
    assert y_half.dtype == torch.bfloat16
    assert torch.equal(y_half, op_result(layer, half).bfloat16())


@pytest.mark.parametrize("kind,values", LAYERS)
def test_buffers_changed_after_a_call_are_read_anew(kind, values):
    layer, other = make_layer(kind, values), make_layer(kind, values, scale=2.0)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(other.state_dict())  # copied into the same buffers
        after = layer(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, op_result(other, x))
        layer.bias = torch.zeros(N)  # a buffer replaced by a new tensor
        no_bias = layer(x)
    assert not torch.equal(no_bias, after)
    assert torch.equal(no_bias, op_result(layer, x))
