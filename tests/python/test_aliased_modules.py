"""A module registered under two names (T5's shared / encoder.embed_tokens, or any alias) is
compressed under both: one module stays one module, and what the forward runs is what the
report and the saved file describe."""
import pytest
import torch
from torch import nn

import tensorslim as ts


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Embedding(100, 64)
        self.enc = nn.Module()
        self.enc.embed_tokens = self.shared
        self.enc.fc = nn.Linear(64, 64)
        self.proj = self.enc.fc
        self.head = nn.Linear(64, 100, bias=False)

    def forward(self, ids):
        return self.head(self.proj(self.enc.fc(self.enc.embed_tokens(ids))))


@pytest.mark.parametrize("verb, cfg", [
    ("quantize", ts.Int4WeightOnly(group_size=32)),
    ("quantize", ts.Int8Dynamic()),
    ("sparsify", ts.NM(2, 4)),
    ("factorize", ts.SVD(rank=8)),
])
def test_every_name_of_an_aliased_module_gets_the_compressed_one(verb, cfg, tmp_path):
    model = Aliased()
    getattr(ts, verb)(model, cfg, progress=False)
    assert model.proj is model.enc.fc and model.enc.embed_tokens is model.shared
    assert type(model.enc.fc) is not nn.Linear, verb  # compressed, under both names
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        emb = model.shared(ids)
        want = model.head(model.enc.fc(model.enc.fc(emb)))
        assert torch.equal(model(ids), want)
        ts.save(model, tmp_path / "m.safetensors")
        fresh = Aliased()
        ts.load(fresh, tmp_path / "m.safetensors")
        assert fresh.proj is fresh.enc.fc and fresh.enc.embed_tokens is fresh.shared
        assert type(fresh.enc.fc) is type(model.enc.fc)
        assert torch.equal(fresh(ids), want)
