"""Prune a decoder LM to 70%, win back accuracy by fine-tuning, store it sparse: the usual recipe
for LLMs, end to end on the CPU, on the tiny LLaMA-style byte LM tensorslim.eval.tiny_lm
(3 blocks, trained here on the standard library's pydoc text).

  1. one shot: `ts.sparsify(lm, ts.Unstructured(0.7, method="wanda", profile="owl",
     store="masks"), calib_data=...)`: Wanda's scores, OWL's per-block sparsities (blocks with
     more outlier weights keep more), the pruned layers left dense under ts.prune masks;
  2. fine-tune a few steps with the masks held (any training loop: the zeros stay);
  3. `ts.sparsify(lm, ts.SparseStorage(values="int8"))`: the zeros stored sparse (CSR rows,
     int8 values), saved as safetensors and loaded back.
Prints the held-out perplexity after each step, the bytes of the linear layers and of the files.

    python examples/sparsify_llm.py          # ~10 s on 2 cores
"""
import copy
import tempfile
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.eval import perplexity
from tensorslim.eval import tiny_lm as T


def linear_bytes(model) -> int:
    """Bytes of the (possibly sparse) linear layers inside the decoder blocks."""
    return sum(t.numel() * t.element_size() for n, m in model.named_modules() if ".layers." in n
               and not list(m.children()) for t in m.state_dict().values() if not n.endswith("norm"))


def main(sparsity: float = 0.7, steps: int = 60) -> dict:
    dense = T.load_tiny_lm()
    train, held = T.train_eval_split()
    ids = held[: 8 * T.SEQ_LEN]
    calib = [train[i * T.SEQ_LEN:(i + 1) * T.SEQ_LEN][None] for i in range(16)]
    ppl = lambda m: perplexity(m, ids, seq_len=T.SEQ_LEN)  # noqa: E731
    out = {"dense": ppl(dense)}
    print(f"dense perplexity {out['dense']:.3f}")

    lm = copy.deepcopy(dense)
    report = ts.sparsify(lm, ts.Unstructured(sparsity, method="wanda", profile="owl", owl_lambda=0.04,
                                             store="masks"), calib_data=calib, progress=False)
    per_block = sorted({(c.name.split(".")[2], c.format.split()[0]) for c in report.changed})
    out["one_shot"] = ppl(lm)
    print(f"{sparsity:.0%} Wanda + OWL, one shot: perplexity {out['one_shot']:.3f}; blocks' sparsity "
          + ", ".join(f"{b}: {s}" for b, s in per_block))

    T.fine_tune(lm, steps)  # AdamW on the training text, lr 1e-3: the masks keep the zeros
    out["fine_tuned"] = ppl(lm)
    print(f"fine-tuned {steps} steps with the masks held: perplexity {out['fine_tuned']:.3f}")

    report = ts.sparsify(lm, ts.SparseStorage(values="int8"), progress=False)
    out["stored"] = ppl(lm)
    out["linear_ratio"] = linear_bytes(lm) / linear_bytes(dense)
    print(f"stored sparse (CSR, int8 values): perplexity {out['stored']:.3f}; the blocks' linears "
          f"{linear_bytes(dense) / 2**20:.2f} -> {linear_bytes(lm) / 2**20:.2f} MiB ({out['linear_ratio']:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        dense_path, path = Path(tmp) / "dense.safetensors", Path(tmp) / "sparse.safetensors"
        ts.save(dense, dense_path)
        ts.save(lm, path)
        fresh = ts.load(T.build_model().eval(), path)
        x = ids[: T.SEQ_LEN][None]
        with torch.inference_mode():
            out["loaded_same"] = torch.equal(fresh(x).logits, lm(x).logits)
        out["file_ratio"] = path.stat().st_size / dense_path.stat().st_size
    print(f"file {out['file_ratio']:.2f}x the dense one (embeddings and lm_head stay dense); loaded model gives "
          f"the same logits: {out['loaded_same']}")
    out["report"] = report
    return out


if __name__ == "__main__":
    main()
