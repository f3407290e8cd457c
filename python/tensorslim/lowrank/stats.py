"""Input statistics of linear layers for activation-aware SVD, from one calibration pass:
mean |x| per input channel (ASVD) and the Gram matrix X^T X / N (SVD-LLM)."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from .._identity import tensor_identity
from ..quantization import token_mask


@dataclass
class InputStats:
    abs_sum: torch.Tensor           # sum |x| per input channel, float64
    gram: Optional[torch.Tensor]    # sum x^T x, float64 (only when asked for)
    count: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def mean_gram(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)


def collect_input_stats(model: nn.Module, layers: Dict[str, nn.Linear], forward_loop,
                        with_gram: bool) -> Dict[str, InputStats]:
    """Run forward_loop(model) once with hooks on `layers`; every input row counts once (a layer
    it never ran has no entry).
    Layers fed the very same tensor in a row (attention's q, k, v), unchanged, reuse its sums."""
    stats: Dict[str, InputStats] = {}
    last = {"input": None, "key": None, "sums": None}  # holding the tensor keeps the identity check sound

    def sums(x: torch.Tensor, width: int):
        x = token_mask.rows(x.detach(), width)
        gram = None
        if with_gram:  # one fp32 product per batch, summed over batches in fp64
            xf = x.float()
            gram = (xf.T @ xf).double()
        return x.abs().sum(0, dtype=torch.float64), gram, x.shape[0]

    def hook(name):
        def fn(mod, args, out):
            key = tensor_identity(args[0])  # changed in place in between (x += f(x)): new sums
            if args[0] is not last["input"] or key != last["key"]:
                last["input"], last["key"], last["sums"] = args[0], key, sums(args[0], mod.in_features)
            abs_sum, gram, rows = last["sums"]
            s = stats.get(name)
            if s is None:
                s = stats[name] = InputStats(torch.zeros_like(abs_sum),
                                             torch.zeros_like(gram) if gram is not None else None)
            s.abs_sum += abs_sum
            if gram is not None:
                s.gram += gram
            s.count += rows
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in layers.items()]
    try:
        forward_loop(model)
    finally:
        last["input"] = last["key"] = last["sums"] = None
        for h in handles:
            h.remove()
    return stats
