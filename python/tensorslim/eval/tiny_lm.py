"""A tiny byte-level causal language model trained on `pydoc_data.topics`, for tests and docs.

No tokenizer and no download: tokens are UTF-8 bytes (vocab 256), the text ships with
Python, and the architecture is transformers' LLaMA (RMSNorm, rotary attention, SwiGLU MLP),
so the calibration code meets the same module structure as real LLMs. Hidden sizes are
multiples of 128 so group-128 quantization applies to every layer.

    python -m tensorslim.eval.tiny_lm tests/data/tiny_llama_pydoc.safetensors   # ~3 min, 1 thread

trains deterministically and writes the weights (fp32 safetensors, ~3 MB); `load_tiny_lm`
reads them back (training first if the file is missing).
"""
import os
import sys
import time
from typing import Tuple

import torch

SEQ_LEN = 128
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN * 4,
              rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False)
DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "data",
                            "tiny_llama_pydoc.safetensors")


def pydoc_bytes() -> torch.Tensor:
    """All pydoc topics (sorted by key) as one int64 tensor of UTF-8 bytes."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def train_eval_split(tokens: torch.Tensor = None, eval_fraction: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, eval): the last `eval_fraction` of the text is held out."""
    tokens = pydoc_bytes() if tokens is None else tokens
    cut = int(len(tokens) * (1 - eval_fraction))
    return tokens[:cut], tokens[cut:]


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def train(steps: int = 500, batch: int = 16, lr: float = 3e-3, seed: int = 0,
          log: bool = True) -> torch.nn.Module:
    """Train from scratch with AdamW and a cosine schedule; deterministic for a given seed."""
    torch.manual_seed(seed)
    model = build_model().train()
    data, _ = train_eval_split()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data) - SEQ_LEN - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + SEQ_LEN] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    return model.eval()


def fine_tune(model: torch.nn.Module, steps: int = 60, lr: float = 1e-3, batch: int = 8, seed: int = 1
              ) -> torch.nn.Module:
    """Continue training `model` (a pruned one, say: ts.prune's masks keep its zeros) with AdamW
    on random windows of the training text, constant lr, no weight decay; returns it in eval mode."""
    data, _ = train_eval_split()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data) - SEQ_LEN - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + SEQ_LEN] for i in idx])
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    return model.eval()


def save_tiny_lm(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"config": repr(CONFIG)})


def load_tiny_lm(path: str = DEFAULT_PATH, train_if_missing: bool = True) -> torch.nn.Module:
    """The trained tiny LLaMA in fp32 eval mode (trains and saves it first if `path` is missing)."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        if not train_if_missing:
            raise FileNotFoundError(f"{path}: no tiny LM weights; run python -m tensorslim.eval.tiny_lm")
        save_tiny_lm(train(log=False), path)
    model = build_model()
    model.load_state_dict(load_file(path))
    return model.eval()


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH
    torch.set_num_threads(1)
    save_tiny_lm(train(), out)
    print(f"wrote {out}")
