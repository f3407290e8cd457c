"""Embedding cosine of all-MiniLM-L6-v2 vs fp32 after low-rank SVD of its encoder linears,
for each method (plain SVD, ASVD, SVD-LLM) and several fractions of the parameters kept, as a
markdown table: per layer (SVD(ratio=...)) or as one global budget (SVD(budget=...)).
Calibrated on pydoc sentences, evaluated on different ones.

    HF_HUB_OFFLINE=1 python benchmarks/lowrank_minilm.py [--kept 0.9 0.8 0.7 0.6] [--mode ratio budget]
"""
import argparse
import copy
import time

import torch
from torch import nn

import tensorslim as ts
from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences

N_EVAL, N_CALIB = 96, 128


def setup(n_eval=N_EVAL, n_calib=N_CALIB, batch=16):
    """(model, tokenizer, held-out sentences, calibration batches, fp32 embeddings)."""
    model, tok = load_minilm()
    pool = pydoc_sentences(n_eval + n_calib)
    held_out, calib_text = pool[:n_eval], pool[n_eval:]
    # Sorted by length so batches hold little padding (padded positions enter the statistics).
    calib_text = sorted(calib_text, key=lambda s: len(tok(s)["input_ids"]))
    calib = [dict(tok(calib_text[i:i + batch], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")) for i in range(0, n_calib, batch)]
    return model, tok, held_out, calib, embed(model, tok, held_out)


def linear_params(model: nn.Module) -> int:
    """Weight parameters of the encoder's linears (dense or factorized)."""
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "pooler" not in n)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kept", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    p.add_argument("--mode", nargs="+", default=["ratio", "budget"], choices=["ratio", "budget"])
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd_llm"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok, held_out, calib, ref = setup()
    dense = linear_params(model)
    print(f"MiniLM-L6 encoder linears: {dense / 1e6:.2f} M weight parameters; "
          f"{len(held_out)} held-out sentences, {len(calib)} calibration batches")
    print("| parameters kept | selection | " + " | ".join(args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    for kept in args.kept:
        for mode in args.mode:
            cells = []
            for method in args.methods:
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                ts.factorize(m, ts.SVD(method=method, **{mode: kept}),
                             calib_data=None if method == "svd" else calib, progress=False)
                secs = time.perf_counter() - t0
                cos = embedding_cosine(embed(m, tok, held_out), ref)
                cells.append(f"{cos:.4f}")
                print(f"  {mode} {kept} {method}: kept {linear_params(m) / dense:.3f}, cosine {cos:.4f}, "
                      f"{secs:.1f} s", flush=True)
            print(f"| {kept:.0%} | {mode} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()
