"""Low-rank factorization of a sentence encoder: all-MiniLM-L6-v2 with 20% fewer encoder
linear parameters by SVD-LLM (whitened truncated SVD), then INT8 weights on the factors,
saved and loaded back into a fresh copy of the original model.

    HF_HUB_OFFLINE=1 python examples/factorize_minilm.py    # about a minute on 2 cores
"""
import copy
import tempfile
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences

torch.set_num_threads(1)  # a shared 2-core machine; raise on your own
model, tok = load_minilm()
pool = pydoc_sentences(160)
held_out, calib_text = pool[:96], sorted(pool[96:], key=len)
calib = [dict(tok(calib_text[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
         for i in range(0, len(calib_text), 16)]
ref = embed(model, tok, held_out)

slim = copy.deepcopy(model)
ts.factorize(slim, ts.SVD(ratio=0.8, method="svd_llm"), calib_data=calib)
print(f"SVD-LLM, 20% fewer linear parameters: cosine {embedding_cosine(embed(slim, tok, held_out), ref):.4f}")
ts.quantize(slim, ts.Int8WeightOnly())
print(f"+ INT8 factors:                       cosine {embedding_cosine(embed(slim, tok, held_out), ref):.4f}")
print(ts.summary(slim))

with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "minilm.slim.safetensors"
    ts.save(slim, path)
    fresh, _ = load_minilm()
    ts.load(fresh, path)
    same = torch.equal(embed(fresh, tok, held_out), embed(slim, tok, held_out))
    print(f"saved {path.stat().st_size / 2**20:.1f} MiB; reloaded into the original architecture: "
          f"{'identical' if same else 'DIFFERENT'} embeddings")
