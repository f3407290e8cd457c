"""Perplexity of a causal language model on a token sequence, with a sliding window.

The sequence is read in windows of at most `seq_len` tokens whose starts are `stride`
apart (the recipe of the Hugging Face perplexity guide). A window scores only the tokens the
previous window did not reach, and uses the tokens before them (up to seq_len - stride of
them) as context only: their labels are masked out. No token is scored twice. A window's
own first token has no context inside it and is not scored, so with stride < seq_len the
N tokens give N - 1 predictions, and with stride == seq_len (disjoint windows, each token
seeing only the earlier tokens of its own window) N - (number of windows).

The negative log-likelihoods are summed in float64 and perplexity = exp(sum / count).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"perplexity: the model must return logits (a tensor, or an output with "
                        f".logits), got {type(out).__name__}")
    return logits


@torch.no_grad()
def perplexity(model, token_ids, seq_len: int = 512, stride: Optional[int] = None,
               return_nll: bool = False):
    """exp(mean negative log-likelihood) of `token_ids` (1-D) under a causal LM.

    model(ids [1, T]) must return logits [1, T, vocab] (a tensor or an object with .logits,
    e.g. a transformers CausalLM). stride defaults to seq_len (disjoint windows); a smaller
    stride gives each scored token up to seq_len - stride tokens of extra context.
    With return_nll=True returns (perplexity, total NLL in nats, number of scored tokens).
    """
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"perplexity: token_ids must be 1-D (one sequence), got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"perplexity: token_ids must be integers, got {ids.dtype}")
    if len(ids) < 2:
        raise ValueError("perplexity: need at least 2 tokens")
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"perplexity: need seq_len >= 2 and 1 <= stride <= seq_len, "
                         f"got seq_len={seq_len}, stride={stride}")
    params = list(model.parameters()) + list(model.buffers())
    device = params[0].device if params else torch.device("cpu")
    ids = ids.to(device, torch.long)
    n = len(ids)
    total, count = 0.0, 0
    scored_to = 1  # tokens [1, scored_to) have been scored; token 0 never is
    begin = 0
    while scored_to < n:
        end = min(begin + seq_len, n)
        window = ids[begin:end]
        logits = _logits(model, window[None])[0].double()
        # position p of the window predicts token begin + p + 1
        first = max(scored_to - begin - 1, 0)  # first prediction not scored yet
        pred = logits[first:len(window) - 1]
        target = window[first + 1:]
        total += float(F.cross_entropy(pred, target, reduction="sum"))
        count += len(target)
        scored_to = end
        if end == n:
            break
        begin += stride
    ppl = math.exp(total / count)
    return (ppl, total, count) if return_nll else ppl
