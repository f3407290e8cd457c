"""Input statistics of linear layers for activation-aware SVD, from one calibration pass:
mean |x| per input channel (ASVD) and the Gram matrix X^T X / N (SVD-LLM)."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn


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
    """Run forward_loop(model) once with hooks on `layers`; every input row counts once."""
    stats: Dict[str, InputStats] = {}

    def hook(name):
        def fn(mod, args, out):
            x = args[0].detach().reshape(-1, mod.in_features).double()
            s = stats.get(name)
            if s is None:
                gram = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64,
                                   device=x.device) if with_gram else None
                s = stats[name] = InputStats(torch.zeros(mod.in_features, dtype=torch.float64,
                                                         device=x.device), gram)
            s.abs_sum += x.abs().sum(0)
            if with_gram:
                s.gram.addmm_(x.T, x)
            s.count += x.shape[0]
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in layers.items()]
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - set(stats))
    if missing:
        raise ValueError(f"calibration never ran through layers {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; activation-aware SVD needs their inputs")
    return stats
