"""Accuracy of ts.sparsify's methods on two real models, one table each (no timing):
  - all-MiniLM-L6-v2: mean cosine of sentence embeddings against fp32 on held-out pydoc
    sentences, calibrated on 128 others;
  - the tiny LLaMA-style byte LM (tensorslim.eval.tiny_lm): perplexity on its held-out text,
    calibrated on 16 windows of its training text.
Patterns: 50% unstructured, 2:4, 4:8, and 2:4 with int8 / int4 values; methods magnitude, Wanda
and SparseGPT (with int8 / int4 values SparseGPT quantizes in the same sweep). Under each table,
2:4 SparseGPT with float values whose weights are then rounded to int4 (ts.SparseStorage): what
the joint sweep is measured against. Then a table of layerwise profiles at 60% and 70%
unstructured: every layer at the sparsity ("uniform") against OWL's per-block sparsities
(profile="owl", owl_m 5, owl_lambda 0.04 and 0.08). Then, on the tiny LM, fine-tuning after
pruning: 70% Wanda and 2:4 SparseGPT kept as masks (store="masks"), 60 AdamW steps of 8 windows
of its training text at lr 1e-3 and 3e-4, then stored sparse, beside the dense model fine-tuned
alike (the control). And bias correction (bias_correction=True) against none, for magnitude and
Wanda at 50% and 2:4.

    python benchmarks/sparsity_accuracy.py [--quick] [--only patterns|owl|masks|bias]
"""
import argparse
import copy
import dataclasses

import torch

import tensorslim as ts

PATTERNS = {
    "50% unstructured": lambda method: ts.Unstructured(0.5, method=method),
    "2:4": lambda method: ts.NM(2, 4, method=method),
    "4:8": lambda method: ts.NM(4, 8, method=method),
    "2:4 + int8 values": lambda method: ts.NM(2, 4, method=method, values="int8"),
    "2:4 + int4 values": lambda method: ts.NM(2, 4, method=method, values="int4"),
}
METHODS = ("magnitude", "wanda", "sparsegpt")


PROFILES = {
    "uniform": lambda s, method: ts.Unstructured(s, method=method),
    "owl, lambda 0.04": lambda s, method: ts.Unstructured(s, method=method, profile="owl", owl_lambda=0.04),
    "owl, lambda 0.08": lambda s, method: ts.Unstructured(s, method=method, profile="owl", owl_lambda=0.08),
}


def _table(title, metric, score, only):
    if only in (None, "patterns"):
        print(f"\n{title}\n| pattern | " + " | ".join(METHODS) + " |\n|---|" + "---|" * len(METHODS))
        for pattern, make in PATTERNS.items():
            print(f"| {pattern} | " + " | ".join(f"{score(make(m)):.4f}" for m in METHODS) + " |", flush=True)
        later = score(ts.NM(2, 4, method="sparsegpt"), then=ts.SparseStorage(layout="nm", values="int4"))
        print(f"2:4 SparseGPT float values, rounded to int4 afterwards: {later:.4f}", flush=True)
    if only in (None, "bias"):
        print(f"\n{title}, bias correction\n| pattern | magnitude | + bias correction | Wanda | + bias correction |\n"
              f"|---|---|---|---|---|")
        for pattern in ("50% unstructured", "2:4"):
            make = PATTERNS[pattern]
            cells = [score(dataclasses.replace(make(m), bias_correction=bc)) for m in ("magnitude", "wanda")
                     for bc in (False, True)]
            print(f"| {pattern} | " + " | ".join(f"{c:.4f}" for c in cells) + " |", flush=True)
    if only in (None, "owl"):
        print(f"\n{title}, layerwise profiles\n| sparsity, profile | " + " | ".join(METHODS) + " |\n|---|"
              + "---|" * len(METHODS))
        for sparsity in (0.6, 0.7):
            for profile, make in PROFILES.items():
                print(f"| {sparsity:.0%} {profile} | " + " | ".join(f"{score(make(sparsity, m)):.4f}" for m in METHODS)
                      + " |", flush=True)


def _sparsified(model, cfg, calib, then=None):
    """A copy of model sparsified by cfg; with `then`, its sparse layers' weights put back into
    dense copies of the layers and stored again by `then` (a SparseStorage)."""
    m = copy.deepcopy(model)
    ts.sparsify(m, cfg, calib_data=calib if cfg.needs_data else None, progress=False)
    if then is None:
        return m
    dense = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if isinstance(mod, ts.NMSparseLinear):
            dense.get_submodule(name).weight.data = mod.dequantized_weight().to(dense.get_submodule(name).weight)
    ts.sparsify(dense, then, progress=False)
    return dense


def minilm(n_eval: int, n_calib: int, only):
    from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences

    model, tok = load_minilm()
    pool = pydoc_sentences(n_eval + n_calib)
    held, calib_text = pool[:n_eval], pool[n_eval:]
    calib_text = sorted(calib_text, key=lambda s: len(tok(s)["input_ids"]))
    calib = [dict(tok(calib_text[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, n_calib, 16)]
    ref = embed(model, tok, held)

    def score(cfg, then=None):
        return embedding_cosine(embed(_sparsified(model, cfg, calib, then), tok, held), ref)

    _table(f"MiniLM embedding cosine vs fp32 ({n_eval} held-out sentences, {n_calib} calibration)", "cosine", score,
           only)


def tiny_lm(n_windows: int, only):
    from tensorslim.eval import perplexity
    from tensorslim.eval import tiny_lm as T

    lm = T.load_tiny_lm()
    train, held = T.train_eval_split()
    ids = held[: 8 * T.SEQ_LEN]
    calib = [train[i * T.SEQ_LEN:(i + 1) * T.SEQ_LEN][None] for i in range(n_windows)]
    print(f"\ntiny LM dense perplexity {perplexity(lm, ids, seq_len=T.SEQ_LEN):.3f}")

    def score(cfg, then=None):
        return perplexity(_sparsified(lm, cfg, calib, then), ids, seq_len=T.SEQ_LEN)

    _table(f"tiny LM perplexity ({len(ids)} held-out bytes, {n_windows} calibration windows)", "perplexity", score,
           only)


def tiny_lm_recovery(n_windows: int):
    """Perplexity one shot, after fine-tuning with the masks held (two learning rates), and once
    stored sparse; the dense model fine-tuned alike as the control."""
    from tensorslim.eval import perplexity
    from tensorslim.eval import tiny_lm as T

    lm = T.load_tiny_lm()
    train, held = T.train_eval_split()
    ids = held[: 8 * T.SEQ_LEN]
    calib = [train[i * T.SEQ_LEN:(i + 1) * T.SEQ_LEN][None] for i in range(n_windows)]
    ppl = lambda m: perplexity(m, ids, seq_len=T.SEQ_LEN)  # noqa: E731
    print("\ntiny LM perplexity, fine-tuned after pruning (60 AdamW steps, 8 windows each)\n"
          "| pruned one shot | one shot | fine-tuned, lr 1e-3 | lr 3e-4 | stored sparse (lr 1e-3) |\n"
          "|---|---|---|---|---|")
    for name, cfg in (("70% Wanda", ts.Unstructured(0.7, method="wanda", store="masks")),
                      ("2:4 SparseGPT", ts.NM(2, 4, method="sparsegpt", store="masks"))):
        pruned = copy.deepcopy(lm)
        ts.sparsify(pruned, cfg, calib_data=calib, progress=False)
        tuned = {lr: T.fine_tune(copy.deepcopy(pruned), lr=lr) for lr in (1e-3, 3e-4)}
        before = ppl(tuned[1e-3])
        ts.sparsify(tuned[1e-3], ts.SparseStorage(), progress=False)
        print(f"| {name} | {ppl(pruned):.3f} | {before:.3f} | {ppl(tuned[3e-4]):.3f} | {ppl(tuned[1e-3]):.3f} |",
              flush=True)
    dense = {lr: ppl(T.fine_tune(copy.deepcopy(lm), lr=lr)) for lr in (1e-3, 3e-4)}
    print(f"| dense, the same fine-tune | {ppl(lm):.3f} | {dense[1e-3]:.3f} | {dense[3e-4]:.3f} | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sentences and windows")
    ap.add_argument("--only", choices=("patterns", "owl", "masks", "bias"), help="one kind of table (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only != "masks":
        minilm(32 if args.quick else 96, 32 if args.quick else 128, args.only)
        tiny_lm(4 if args.quick else 16, args.only)
    if args.only in (None, "masks"):
        tiny_lm_recovery(4 if args.quick else 16)


if __name__ == "__main__":
    main()
