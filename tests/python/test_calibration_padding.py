"""Padded positions of a calibration batch (dict batches with a 0/1 `attention_mask`) are left
out of every calibrated statistic: calibrating on right-padded batches gives bit for bit the
model that calibrating on the same real tokens without padding gives. The pad token here has
an embedding 50x the others, so counting it changes every range, Hessian and norm."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAD = 0


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, h, attention_mask=None):
        return h + self.down(F.gelu(self.up(h)))


class TokenModel(nn.Module):
    """Tokens run independently (no attention), so a token's activations do not depend on
    what else is in its batch: padded and unpadded batches give the same real-token rows."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.emb = nn.Embedding(40, d)
        with torch.no_grad():
            self.emb.weight[PAD] *= 50.0
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 8)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return self.head(h)


def _batches():
    g = torch.Generator().manual_seed(0)
    lengths = [[5, 12, 3, 9], [11, 2, 7, 12]]
    padded, real = [], []
    for lens in lengths:
        ids = torch.full((len(lens), max(lens)), PAD)
        mask = torch.zeros(len(lens), max(lens), dtype=torch.int64)
        for i, n in enumerate(lens):
            ids[i, :n] = torch.randint(1, 40, (n,), generator=g)
            mask[i, :n] = 1
        padded.append({"input_ids": ids, "attention_mask": mask})
        # the same real tokens, row-major, as one unpadded sequence
        flat = ids[mask.bool()][None]
        real.append({"input_ids": flat, "attention_mask": torch.ones_like(flat)})
    return padded, real


RECIPES = {
    "w8a8": lambda m, d: ts.quantize(m, ts.W8A8(smoothquant_alpha=0.5), calib_data=d, progress=False),
    "gptq": lambda m, d: ts.quantize(m, ts.Int4WeightOnly(group_size=32, algorithm="gptq"), calib_data=d,
                                     progress=False),
    "awq": lambda m, d: ts.quantize(m, ts.Int4WeightOnly(group_size=32, algorithm="awq"), calib_data=d,
                                    progress=False),
    "wanda": lambda m, d: ts.sparsify(m, ts.Unstructured(0.5, method="wanda"), calib_data=d, progress=False),
    "sparsegpt": lambda m, d: ts.sparsify(m, ts.NM(2, 4, method="sparsegpt"), calib_data=d, progress=False),
    "svd_llm": lambda m, d: ts.factorize(m, ts.SVD(ratio=0.5, method="svd_llm"), calib_data=d, progress=False),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_padded_positions_do_not_count(recipe):
    torch.manual_seed(0)
    model = TokenModel().eval()
    padded, real = _batches()
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    RECIPES[recipe](a, padded)
    RECIPES[recipe](b, real)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    # the first block's statistics are the same rows bit for bit; later blocks read the earlier
    # blocks' outputs, computed on a [4, 12, d] and a [1, n, d] tensor (GEMM rounding may differ)
    x = padded[0]["input_ids"]
    with torch.no_grad():
        ya, yb = a(x), b(x)
    print(f"{recipe}: max |padded - real-token model| {float((ya - yb).abs().max()):.3g} "
          f"of outputs up to {float(yb.abs().max()):.3g}")
    torch.testing.assert_close(ya, yb, atol=1e-4 * float(yb.abs().max()), rtol=0)
    for k in sa:
        if k.startswith("layers.0."):
            assert torch.equal(sa[k], sb[k]), k
    # without the masks the pads count (the test's premise): a different model
    RECIPES[recipe](c, [{"input_ids": p["input_ids"]} for p in padded])
    with torch.no_grad():
        yc = c(x)
    assert float((yc - yb).abs().max()) > 100 * float((ya - yb).abs().max()) + 1e-3 * float(yb.abs().max())


def test_mask_rules():
    from tensorslim.quantization import token_mask

    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert token_mask.of_batch({"attention_mask": m}).tolist() == [[True, True, False], [True, False, False]]
    assert token_mask.of_batch({"attention_mask": torch.ones(2, 3)}) is None  # no padding
    assert token_mask.of_batch({"attention_mask": torch.tensor([[0.0, -1e9]])}) is None  # additive, not flags
    assert token_mask.of_batch({"attention_mask": m[None]}) is None and token_mask.of_batch(m) is None
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    with token_mask.padding(token_mask.of_batch({"attention_mask": m})):
        assert torch.equal(token_mask.rows(x, 4), x.reshape(-1, 4)[[0, 1, 3]])
        assert token_mask.rows(x.transpose(0, 1), 4).shape == (6, 4)  # another layout: every row
    assert token_mask.rows(x, 4).shape == (6, 4)  # outside a batch


def test_a_batch_of_padding_only_adds_no_rows():
    torch.manual_seed(0)
    model = TokenModel().eval()
    padded, _ = _batches()
    only_pad = {"input_ids": torch.full((2, 6), PAD), "attention_mask": torch.zeros(2, 6, dtype=torch.int64)}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    RECIPES["gptq"](a, padded + [only_pad])  # before: that batch's mask meant "every row counts"
    RECIPES["gptq"](b, padded)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_no_mask_where_positions_are_not_the_masks():
    """A conv's [B, C, L] input (C may equal T by chance) and an encoder-decoder wrapped in the
    user's module (its decoder positions are not the mask's) keep every row."""
    from types import SimpleNamespace

    from tensorslim.quantization import token_mask
    from tensorslim.quantization.calibrate import make_forward_loop
    from tensorslim.quantization.observers import Observer

    mask = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    x = torch.zeros(2, 4, 4)
    x[1, 3, 0] = 9.0  # a real value at channel 3 of sample 1 (a padded position if read as [B, T, C])
    obs = Observer("max", "tensor")
    with token_mask.padding(token_mask.of_batch(mask)):
        obs.update(x)
    assert float(obs.max) == 9.0

    seen = []

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(is_encoder_decoder=True)

        def forward(self, input_ids, attention_mask):
            seen.append(token_mask.current())

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Seq2Seq()

        def forward(self, **kw):
            return self.inner(**kw)

    make_forward_loop([dict(mask, input_ids=torch.ones(2, 4, dtype=torch.int64))], progress=False)(Wrapper())
    assert seen == [None]


def test_taylor_importance_leaves_padding_out():
    from tensorslim.pruning import channels as C

    torch.manual_seed(0)
    model = TokenModel().eval()
    padded, real = _batches()
    g_pad, g_real = C.taylor_grads(model, padded, None), C.taylor_grads(model, real, None)
    g_all = C.taylor_grads(model, [{"input_ids": p["input_ids"]} for p in padded], None)
    for k in g_real:
        torch.testing.assert_close(g_pad[k], g_real[k], rtol=1e-4, atol=1e-6 * float(g_real[k].abs().max()))
    assert any(not torch.allclose(g_all[k], g_real[k], rtol=1e-2) for k in g_real)
