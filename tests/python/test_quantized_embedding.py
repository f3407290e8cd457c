"""Embedding tables in the weight-only recipes: lookups against the format's reference decode,
EmbeddingBag reductions, tied heads, layer selection, save / load and bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.formats import get_format
from tensorslim.ops.lowbit import dequantize_lowbit_reference, quantize_lowbit_reference


def _reference_table(weight, fmt, group):
    q, scales, zps, tsc = quantize_lowbit_reference(weight.float(), get_format(fmt), group)
    return dequantize_lowbit_reference(q, scales, zps, tsc, get_format(fmt), group, weight.shape[1])


class _Model(nn.Module):
    def __init__(self, vocab=200, dim=64, tie=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.bag = nn.EmbeddingBag(vocab, dim, mode="sum")
        self.proj = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.proj(self.embed(ids)) + self.bag(ids)[:, None, :])


@pytest.mark.parametrize("config,fmt,group", [(ts.Int8WeightOnly(), "int8", 64),
                                              (ts.Int4WeightOnly(group_size=32), "int8", 64),  # tables: INT8 rows
                                              (ts.Int4WeightOnly(group_size=32, embedding_bits=4), "int4", 32),
                                              (ts.Int4WeightOnly(group_size=32, symmetric=False, embedding_bits=4),
                                               "uint4", 32),
                                              (ts.Int4WeightOnly(group_size=128, embedding_bits=4), "int4", 64),
                                              (ts.Int8WeightOnly(group_size=32), "int8", 64)])  # 8 bits: per row
def test_lookup_matches_reference_decode(config, fmt, group):
    model = _Model()
    table = _reference_table(model.embed.weight.detach(), fmt, group)
    report = ts.quantize(model, config, progress=False)
    assert isinstance(model.embed, ts.QuantizedEmbedding) and model.embed.fmt == fmt
    assert {c.name for c in report.changed} >= {"embed", "bag"}
    ids = torch.randint(0, 200, (3, 9))
    assert torch.equal(model.embed(ids), table[ids])
    assert torch.equal(model.embed.weight, table)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_reductions(mode):
    bag = nn.EmbeddingBag(50, 32, mode=mode)
    q = ts.QuantizedEmbeddingBag.from_embedding(bag, "int8")
    ids = torch.tensor([3, 7, 7, 49, 0, 12])
    offsets = torch.tensor([0, 2, 5])
    table = _reference_table(bag.weight.detach(), "int8", 32)
    weights = torch.rand(6) if mode == "sum" else None
    want = F.embedding_bag(ids, table, offsets, mode=mode, per_sample_weights=weights)
    torch.testing.assert_close(q(ids, offsets, weights), want)
    two_d = torch.tensor([[1, 2], [3, 3]])
    torch.testing.assert_close(q(two_d), F.embedding_bag(two_d, table, mode=mode))


def test_tied_head_stays_tied_and_is_reported():
    model = _Model(tie=True)
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["embed"].action == "skipped" and "tied to the output layer 'lm_head'" in rows["embed"].reason
    assert rows["lm_head"].action == "skipped"
    assert model.lm_head.weight is model.embed.weight


def test_a_tied_table_is_packed_when_its_head_is():
    """skip_output_head=False packs the head: the table kept float then added a float copy to
    the packed head (more memory than the one tied tensor); it is packed too."""
    model = _Model(tie=True)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # the tied tensor once
    dense = sum(t.numel() * t.element_size() for t in unique.values())
    report = ts.quantize(model, ts.Int8WeightOnly(skip_output_head=False), progress=False)
    rows = {c.name: c for c in report.changes}
    assert rows["embed"].action == "quantized" and rows["embed"].reason == "tied to 'lm_head', packed too"
    assert isinstance(model.embed, ts.nn.QuantizedEmbedding) and isinstance(model.lm_head, ts.WeightOnlyLinear)
    assert torch.equal(model.embed.qweight, model.lm_head.qweight)  # the same int8 rows, twice
    packed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert packed < 0.6 * dense


def test_exclude_keeps_tables_float():
    model = _Model()
    report = ts.quantize(model, ts.Int8WeightOnly(exclude=("embed", "bag")), progress=False)
    assert type(model.embed) is nn.Embedding and type(model.bag) is nn.EmbeddingBag
    assert {c.name for c in report.skipped} >= {"embed", "bag"}


def test_save_load_round_trip(tmp_path):
    model = _Model()
    ts.quantize(model, ts.Int4WeightOnly(group_size=32, embedding_bits=4), progress=False)
    path = tmp_path / "m.slim.safetensors"
    ts.save(model, path)
    fresh = _Model()
    ts.load(fresh, path)
    ids = torch.randint(0, 200, (2, 5))
    assert torch.equal(fresh(ids), model(ids))
    assert isinstance(fresh.bag, ts.QuantizedEmbeddingBag) and fresh.embed.padding_idx == 0


def test_bad_ids():
    q = ts.QuantizedEmbedding.from_embedding(nn.Embedding(10, 8), "int8")
    with pytest.raises(IndexError, match="out of range"):
        q(torch.tensor([10]))
    with pytest.raises(IndexError, match="out of range"):
        q(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        q(torch.tensor([1.0]))


def test_failure_leaves_model_unchanged():
    model = _Model()
    model.bag.weight.data[3, 3] = float("nan")
    with pytest.raises(ValueError, match="'bag'.*NaN"):
        ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert type(model.embed) is nn.Embedding and type(model.proj) is nn.Linear


def test_summary_lists_tables():
    model = _Model()
    ts.quantize(model, ts.Int4WeightOnly(group_size=32, embedding_bits=4), progress=False)
    rows = {r.name: r for r in ts.summary(model).changed}
    assert rows["embed"].format == "int4 g32" and rows["embed"].bytes_before == 4 * 200 * 64
    assert rows["embed"].bytes_after < rows["embed"].bytes_before / 6


def test_half_changes_output_dtype_not_the_table():
    q = ts.QuantizedEmbedding.from_embedding(nn.Embedding(30, 16), "int4", 8)
    ids = torch.tensor([[1, 29, 3]])
    ref = q(ids)
    q.half()
    assert q.scales.dtype == torch.float32 and q.qweight.dtype == torch.uint8
    out = q(ids)
    assert out.dtype == torch.float16 and torch.equal(out, ref.half())
    with pytest.raises(TypeError, match="float64"):
        q.double()


@pytest.mark.parametrize("fmt_sym", [True, False])
def test_short_last_group_instead_of_per_row(tmp_path, fmt_sym):
    # 72 wide in groups of 32: two whole groups and one of 8 (it used to fall back to per row).
    model = _Model(dim=72)
    fmt = "int4" if fmt_sym else "uint4"
    table = _reference_table(model.embed.weight.detach(), fmt, 32)
    report = ts.quantize(model, ts.Int4WeightOnly(group_size=32, symmetric=fmt_sym, embedding_bits=4),
                         progress=False)
    assert model.embed.group_size == 32 and model.embed.scales.shape == (200, 3)
    assert {c.name: c.format for c in report.changed}["embed"] == f"{fmt} g32 (last group 8)"
    ids = torch.randint(0, 200, (3, 9))
    assert torch.equal(model.embed(ids), table[ids])
    path = tmp_path / "m.slim.safetensors"
    ts.save(model, path)
    fresh = ts.load(_Model(dim=72), path)
    assert torch.equal(fresh.embed(ids), table[ids]) and torch.equal(fresh.bag.weight, model.bag.weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tables_look_up_in_their_dtype(dtype):
    """A half-precision model's tables come back computing in its dtype (they decoded to
    float32, and the next half LayerNorm raised 'mixed dtype')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8)).to(dtype)
    bag = nn.EmbeddingBag(10, 8, mode="sum").to(dtype)
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    holder = nn.Module()
    holder.bag = bag
    ts.quantize(holder, ts.Int8WeightOnly(), progress=False)
    ids = torch.tensor([[1, 2, 3]])
    assert isinstance(model[0], ts.nn.QuantizedEmbedding) and model(ids).dtype == dtype
    assert isinstance(holder.bag, ts.nn.QuantizedEmbeddingBag) and holder.bag(ids).dtype == dtype
    assert torch.equal(model[0](ids), copy.deepcopy(model[0]).float()(ids).to(dtype))  # the float32 rows, rounded


def test_quantizing_again_reports_the_packed_table_as_already_compressed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 32))
    ts.quantize(model, ts.Int8WeightOnly(skip_output_head=False), progress=False)
    with pytest.warns(UserWarning, match="already compressed"):
        report = ts.quantize(model, ts.Int8WeightOnly(skip_output_head=False), progress=False)
    rows = {c.name: c.reason for c in report.skipped}
    assert set(rows) == {"0", "1"} and all("already compressed" in r for r in rows.values())



def test_lookup_errors_name_the_table():
    """Out-of-range ids in a packed table said which index, not which of the model's tables."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 8))
    bag = nn.Sequential(nn.EmbeddingBag(50, 32, mode="mean"), nn.Linear(32, 8))
    for m in (model, bag):
        ts.quantize(m, ts.Int8WeightOnly(), progress=False)
        assert "Quantized" in type(m[0]).__name__
        ids = torch.tensor([[1, 60]])
        with pytest.raises(IndexError) as info:
            m(ids)
        assert f"in layer '0' ({type(m[0]).__name__})" in info.value.__notes__
