"""Sparse storage ops: pack / unpack round trips (bit-exact for float32 values, the stated
int8 and int4 rules, int4's nibble layout), the native N:M and CSR linears against the
plain-PyTorch reference on every ISA
(tolerance from the float64 product: summation orders differ), tail groups, bad arguments,
fake tensors and torch.compile."""
import pytest
import torch

import tensorslim as ts
from tensorslim.ops import sparse as S


def nm_keep(w: torch.Tensor, n: int, m: int, drop: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Top-n |w| per group of m columns (the tail group too), then a `drop` fraction removed."""
    rows, k = w.shape
    pad = (-k) % m
    a = torch.nn.functional.pad(w.abs(), (0, pad), value=-1.0).reshape(rows, -1, m)
    top = a.topk(min(n, m), dim=-1).indices
    keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, -1)[:, :k]
    if drop:
        g = torch.Generator().manual_seed(seed)
        keep &= torch.rand(keep.shape, generator=g) >= drop
    return keep


def close_to_float64(y, w_dense, x, bias, what=""):
    """|y - y64| <= 1e-5 * sum |w||x| per output (fp32 sums in any order stay within this)."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w_dense.double()
    ref = x64 @ w64.T + (bias.double() if bias is not None else 0)
    mag = x64.abs() @ w64.abs().T + (bias.double().abs() if bias is not None else 0)
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= 1e-5 * mag + 1e-30).all()), f"{what}: max err {float(err.max())}"


NM = [(2, 4), (1, 4), (3, 4), (4, 8), (1, 8), (6, 8)]
NM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, S.INT4_VALUES]


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("k", [4, 8, 33, 130])
def test_nm_round_trip_is_exact(n, m, k):
    w = torch.randn(7, k, generator=torch.Generator().manual_seed(k))
    keep = nm_keep(w, n, m, drop=0.3, seed=1)
    values, indices, scales = S.nm_pack(w, keep, n, m)
    assert scales is None and values.dtype == torch.float32
    assert values.shape == (7, (k + m - 1) // m * n)
    assert torch.equal(S.nm_unpack(values, indices, None, n, m, k), w * keep)
    assert torch.equal(S.nm_unpack_reference(values, indices, None, n, m, k), w * keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nm_half_values_round_to_nearest_even(dtype):
    w = torch.randn(5, 24)
    keep = nm_keep(w, 2, 4)
    values, indices, _ = S.nm_pack(w, keep, 2, 4, dtype)
    assert values.dtype == dtype
    assert torch.equal(S.nm_unpack(values, indices, None, 2, 4, 24), (w * keep).to(dtype).float())


def test_int8_values_follow_the_rule():
    w = torch.randn(6, 40)
    w[3] = 0.0  # an all-zero row: scale 1
    keep = nm_keep(w, 2, 4)
    values, indices, scales = S.nm_pack(w, keep, 2, 4, torch.int8)
    codes, want_scales = S.coded_values_reference(w * keep)
    assert torch.equal(scales, want_scales) and float(scales[3]) == 1.0
    assert torch.equal(S.nm_unpack(values, indices, scales, 2, 4, 40), codes * want_scales[:, None])
    cv, cols, row_ptr, cscales = S.csr_pack(w, keep, torch.int8)
    assert torch.equal(cscales, want_scales)
    assert torch.equal(S.csr_unpack(cv, cols, row_ptr, cscales, 40), codes * want_scales[:, None])


@pytest.mark.parametrize("n,m,k", [(2, 4, 40), (1, 4, 19), (3, 8, 45)])  # 20, 5 (odd), 18 slots per row
def test_int4_values_follow_the_rule(n, m, k):
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(k))
    w[3] = 0.0  # an all-zero row: scale 1
    keep = nm_keep(w, n, m)
    values, indices, scales = S.nm_pack(w, keep, n, m, S.INT4_VALUES)
    slots = (k + m - 1) // m * n
    assert values.dtype == torch.uint8 and values.shape == (6, (slots + 15) // 16 * 8)
    codes, want_scales = S.coded_values_reference(w * keep, qmax=7)
    assert torch.equal(scales, want_scales) and float(scales[3]) == 1.0
    assert int(codes.abs().max()) == 7  # each row's largest kept weight is a full-scale code
    want = codes * want_scales[:, None]
    assert torch.equal(S.nm_unpack(values, indices, scales, n, m, k), want)
    assert torch.equal(S.nm_unpack_reference(values, indices, scales, n, m, k), want)
    # the codes in the layout pack_int4 writes (test_int4_word_layout); unused nibbles 0
    f32, _, _ = S.nm_pack(w * keep, keep, n, m)
    slot_codes = torch.round(f32 / want_scales[:, None]).clamp(-7, 7).to(torch.int8)
    assert torch.equal(values, S.pack_int4(slot_codes))
    assert torch.equal(S.unpack_int4(values, slots), slot_codes)
    padded = torch.nn.functional.pad(slot_codes, (0, -slots % 16))
    assert torch.equal(S.unpack_int4(values, padded.shape[1]), padded)


def test_int4_word_layout():
    # 2:4 over K = 8 keeping columns 0, 3 | 5, 6 with weights 7, -1 | -7, 3 (scale 1): slots 0..3
    # hold codes 7, -1, -7, 3. Even slots 0, 2 are nibbles 0, 1 (byte 0: 0x7, 0x9); odd slots 1, 3
    # are nibbles 8, 9 (byte 4: 0xF, 0x3); the rest of the 64-bit word is 0.
    w = torch.tensor([[7.0, 0, 0, -1, 0, -7, 3, 0]])
    values, _, scales = S.nm_pack(w, w != 0, 2, 4, S.INT4_VALUES)
    assert float(scales[0]) == 1.0
    assert values.tolist() == [[0x7 | 0x9 << 4, 0, 0, 0, 0xF | 0x3 << 4, 0, 0, 0]]
    # 16 slots: slot k at nibble (k % 2) * 8 + k // 2 of the word
    codes = torch.arange(-7, 9)[None].clamp(max=7)
    word = int.from_bytes(bytes(S.pack_int4(codes)[0].tolist()), "little")
    assert [((word >> 4 * ((k % 2) * 8 + k // 2)) + 8) % 16 - 8 for k in range(16)] == codes[0].tolist()


def test_nm_layout_and_tail_rule():
    # 2:4 over K = 6: group 0 keeps columns 1, 3; the tail group (2 real columns) keeps 5, so
    # its free slot takes the smallest unused position 0 with value 0.
    w = torch.arange(1.0, 7.0)[None]
    keep = torch.tensor([[0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    values, indices, _ = S.nm_pack(w, keep, 2, 4)
    assert values.tolist() == [[2.0, 4.0, 0.0, 6.0]]
    assert indices.tolist() == [[1 | 3 << 2 | 0 << 4 | 1 << 6]]
    # 3 bits for m = 8, slot after slot across byte boundaries: 4:8 keeping 0, 2, 5, 7.
    w8 = torch.arange(1.0, 9.0)[None]
    v8, i8, _ = S.nm_pack(w8, torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1]], dtype=torch.bool), 4, 8)
    stream = 0 | 2 << 3 | 5 << 6 | 7 << 9
    assert v8.tolist() == [[1.0, 3.0, 6.0, 8.0]]
    assert i8.tolist() == [[stream & 255, stream >> 8]]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("k", [16, 50, 257])
def test_csr_round_trip_is_exact(sparsity, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(9, k, generator=g)
    keep = torch.rand(9, k, generator=g) >= sparsity
    values, cols, row_ptr, scales = S.csr_pack(w, keep)
    assert scales is None and cols.dtype == torch.uint16 and row_ptr.dtype == torch.int64
    assert values.numel() == int(keep.sum()) and int(row_ptr[-1]) == values.numel()
    assert torch.equal(S.csr_unpack(values, cols, row_ptr, None, k), w * keep)
    assert torch.equal(S.csr_unpack_reference(values, cols, row_ptr, None, k), w * keep)


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("dtype", NM_DTYPES)
def test_nm_linear_native_vs_reference(isa, n, m, dtype):
    g = torch.Generator().manual_seed(n * 10 + m)
    for rows, k in ((1, 7), (33, 101)):
        w = torch.randn(rows, k, generator=g)
        for drop in (0.0, 0.5, 1.0):
            values, indices, scales = S.nm_pack(w, nm_keep(w, n, m, drop), n, m, dtype)
            dense = S.nm_unpack(values, indices, scales, n, m, k)
            bias = torch.randn(rows, generator=g)
            for batch in (0, 1, 3, 8, 17, 64):
                x = torch.randn(batch, k, generator=g)
                y = S.nm_linear(x, values, indices, scales, bias, n, m, k, backend="native")
                ref = S.nm_linear(x, values, indices, scales, bias, n, m, k, backend="reference")
                assert y.shape == (batch, rows)
                what = f"{isa} {n}:{m} {dtype} [{rows}, {k}] drop={drop} batch={batch}"
                close_to_float64(y, dense, x, bias, what)
                close_to_float64(ref, dense, x, bias, what + " (reference)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_csr_linear_native_vs_reference(isa, dtype, sparsity):
    g = torch.Generator().manual_seed(int(sparsity * 100))
    for rows, k in ((1, 7), (37, 300)):
        w = torch.randn(rows, k, generator=g)
        values, cols, row_ptr, scales = S.csr_pack(w, torch.rand(rows, k, generator=g) >= sparsity, dtype)
        dense = S.csr_unpack(values, cols, row_ptr, scales, k)
        for batch in (0, 1, 2, 3, 5, 8, 9, 17, 65):  # 2..8: the small-batch kernels
            x = torch.randn(batch, k, generator=g)
            for bias in (None, torch.randn(rows, generator=g)):
                y = S.csr_linear(x, values, cols, row_ptr, scales, bias, k, backend="native")
                close_to_float64(y, dense, x, bias, f"{isa} csr {dtype} [{rows}, {k}] batch={batch}")
                ref = S.csr_linear(x, values, cols, row_ptr, scales, bias, k, backend="reference")
                close_to_float64(ref, dense, x, bias, "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_sparse_gathers_and_scalar_loads_agree_bit_for_bit(isa, dtype):
    # Batches 1 and 2 read x with gathers (Intel's default) or scalar loads (AMD's): the same
    # x values in the same lanes, so the same sums. Rows long enough for every step kind.
    if isa == "scalar":
        pytest.skip("no x86 kernel")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(29, 531, generator=g)
    values, cols, row_ptr, scales = S.csr_pack(w, torch.rand(29, 531, generator=g) >= 0.7, dtype)
    saved = ts._C.sparse_gathers()
    try:
        for batch in (1, 2):
            x = torch.randn(batch, 531, generator=g)
            ys = []
            for on in (False, True):
                ts._C.set_sparse_gathers(on)
                ys.append(S.csr_linear(x, values, cols, row_ptr, scales, None, 531, backend="native"))
            assert torch.equal(ys[0], ys[1]), f"{isa} {dtype} batch={batch}"
    finally:
        ts._C.set_sparse_gathers(saved)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.int8, S.INT4_VALUES])
def test_nm_codes_on_activation_pieces(isa, n, m, dtype):
    # Where the CPU has AVX-512 VNNI + VBMI, 2:4 / 4:8 int8 / int4 layers with in_features a
    # multiple of 128 run batches 1-12 (2-12 from 2048 columns) on integer units with x as int8
    # pieces (docs/sparsity.md), as on the AVX2 kernels with vpdpbusd (the AVX2 pass with
    # TENSORSLIM_AVX2_VNNI=1); elsewhere and with the pieces off, the float kernels. Both
    # within the float64 bound, whichever runs.
    g = torch.Generator().manual_seed(n * 10 + m)
    w = torch.randn(23, 2048, generator=g)
    values, indices, scales = S.nm_pack(w, nm_keep(w, n, m, drop=0.2, seed=5), n, m, dtype)
    dense = S.nm_unpack(values, indices, scales, n, m, 2048)
    saved = ts._C.activation_pieces_enabled()
    try:
        for batch in (1, 2, 8, 12, 13):
            x = torch.randn(batch, 2048, generator=g)
            bias = torch.randn(23, generator=g)
            for on in (True, False):
                ts._C.set_activation_pieces_enabled(on)
                y = S.nm_linear(x, values, indices, scales, bias, n, m, 2048, backend="native")
                close_to_float64(y, dense, x, bias, f"{isa} {n}:{m} {dtype} batch={batch} pieces={on}")
    finally:
        ts._C.set_activation_pieces_enabled(saved)


def test_leading_dims_and_dtype():
    w = torch.randn(8, 12)
    values, indices, _ = S.nm_pack(w, nm_keep(w, 2, 4), 2, 4)
    x = torch.randn(2, 3, 12)
    y = S.nm_linear(x, values, indices, None, None, 2, 4, 12)
    assert y.shape == (2, 3, 8) and y.dtype == torch.float32
    assert torch.allclose(y, x @ S.nm_unpack(values, indices, None, 2, 4, 12).T, atol=1e-5)


def test_bad_arguments():
    w = torch.randn(4, 8)
    keep = nm_keep(w, 2, 4)
    with pytest.raises(ValueError, match="n must"):
        S.nm_pack(w, keep, 4, 4)
    with pytest.raises(ValueError, match="m must be 4 or 8"):
        S.nm_pack(w, keep, 2, 6)
    with pytest.raises(ValueError, match=r"row 2, group 1"):
        bad = keep.clone()
        bad[2, 4:8] = True
        S.nm_pack(w, bad, 2, 4)
    with pytest.raises(TypeError, match="value_dtype"):
        S.nm_pack(w, keep, 2, 4, torch.float64)
    with pytest.raises(TypeError, match="keep must be bool or uint8"):
        S.nm_pack(w, keep.float(), 2, 4)
    with pytest.raises(ValueError, match="keep must have w's shape"):
        S.nm_pack(w, keep[:, :4], 2, 4)
    nan = w.clone()
    nan[0, keep[0].nonzero()[0, 0]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        S.nm_pack(nan, keep, 2, 4)
    values, indices, _ = S.nm_pack(w, keep, 2, 4)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 8\]"):
        S.nm_linear(torch.randn(3, 9), values, indices, None, None, 2, 4, 8)
    with pytest.raises(ValueError, match="values must be"):
        S.nm_linear(torch.randn(3, 12), values, indices, None, None, 2, 4, 12)
    with pytest.raises(ValueError, match="bias must be float32"):
        S.nm_linear(torch.randn(3, 8), values, indices, None, torch.randn(5), 2, 4, 8)
    with pytest.raises(ValueError, match="scales are only for int8"):
        S.nm_linear(torch.randn(3, 8), values, indices, torch.ones(4), None, 2, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        S.nm_linear(torch.randn(3, 8), values, indices, None, None, 2, 4, 8, backend="onednn")
    with pytest.raises(ValueError, match="65536"):
        S.csr_pack(torch.zeros(1, 65537), torch.zeros(1, 65537, dtype=torch.bool))
    cv, cols, row_ptr, _ = S.csr_pack(w, keep)
    with pytest.raises(ValueError, match="non-decreasing"):
        S.csr_linear(torch.randn(2, 8), cv, cols, torch.tensor([0, 5, 2, 6, 8]), None, None, 8)
    with pytest.raises(ValueError, match=r"row_ptr\[N\]"):
        S.csr_linear(torch.randn(2, 8), cv, cols, torch.tensor([0, 2, 4, 6, 7]), None, None, 8)
    with pytest.raises(ValueError, match="column >= in_features"):
        S.csr_linear(torch.randn(2, 8), cv, torch.full_like(cols, 9), row_ptr, None, None, 8)
    with pytest.raises(ValueError, match="cols must be uint16"):
        S.csr_linear(torch.randn(2, 8), cv, cols.to(torch.int32), row_ptr, None, None, 8)
    with pytest.raises(TypeError, match="value_dtype must be float32 or int8"):
        S.csr_pack(w, keep, torch.bfloat16)
    with pytest.raises(TypeError, match="value_dtype must be float32 or int8"):
        S.csr_pack(w, keep, S.INT4_VALUES)  # CSR stores no int4
    v4, i4, s4 = S.nm_pack(w, keep, 2, 4, S.INT4_VALUES)
    with pytest.raises(ValueError, match="int4 values need float32 scales"):
        S.nm_linear(torch.randn(3, 8), v4, i4, None, None, 2, 4, 8)
    with pytest.raises(ValueError, match=r"values must be \[4, 8\]"):  # whole 64-bit words
        S.nm_linear(torch.randn(3, 8), v4[:, :4], i4, s4, None, 2, 4, 8)


def test_fake_tensors_and_compile():
    w = torch.randn(16, 40)
    keep = nm_keep(w, 2, 4)
    values, indices, scales = S.nm_pack(w, keep, 2, 4, torch.int8)
    cv, cols, row_ptr, _ = S.csr_pack(w, keep)
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    y = torch.ops.tensorslim.nm_linear(torch.empty(5, 40, device="meta"), meta(values), meta(indices),
                                       meta(scales), None, 2, 4)
    assert y.shape == (5, 16) and y.device.type == "meta"
    y = torch.ops.tensorslim.csr_linear(torch.empty(3, 40, device="meta"), meta(cv), meta(cols), meta(row_ptr),
                                        None, None)
    assert y.shape == (3, 16)

    def f(x):
        return (S.nm_linear(x, values, indices, scales, None, 2, 4, 40)
                + S.csr_linear(x, cv, cols, row_ptr, None, None, 40))

    x = torch.randn(6, 40)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), f(x))


def test_native_backend_needs_cpu_tensors():
    w = torch.randn(4, 8)
    values, indices, _ = S.nm_pack(w, nm_keep(w, 2, 4), 2, 4)
    x = torch.randn(2, 8, device="meta")
    with pytest.raises(ValueError, match="needs CPU tensors"):
        S.nm_linear(x, values, indices, None, None, 2, 4, 8, backend="native")


def test_exposed_in_ops():
    assert ts.ops.sparse.nm_linear is S.nm_linear
