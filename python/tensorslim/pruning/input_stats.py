"""What ChannelPrune reads from the calibration data's activations: each consumer layer's input
features' L2 norms (importance="wanda") and means (compensate=True).

A consumer slice is the part of a layer's weight that reads a channel: a linear's input columns
(dim 1), a transformers Conv1D's input rows (dim 0, its weight is [in, out]), an ungrouped
conv's input channels (dim 1; norms only: a conv's padding makes a removed channel's mean
contribution differ at the borders, so it takes no bias compensation).
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..conv1d import is_conv1d
from ..quantization import token_mask
from ..quantization.calibrate import make_forward_loop


@dataclass
class InputStats:
    norms: Dict[str, torch.Tensor]  # module name -> ||X_j||_2 per input feature (float64)
    means: Dict[str, torch.Tensor]  # module name -> mean of X_j (linears and Conv1D only)


def _reads_features(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(weight dim of the input features, their count) of a layer whose input statistics count."""
    if isinstance(m, nn.Linear):
        return 1, m.in_features
    if is_conv1d(m):
        return 0, m.weight.shape[0]
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1:
        return 1, m.in_channels
    return None


def input_stats(model: nn.Module, calib_data, forward_loop, what: str) -> InputStats:
    """One forward pass of the data (padding tokens left out) with every linear, Conv1D and
    ungrouped conv hooked; `what` names the option that needs it in the errors."""
    if calib_data is None and forward_loop is None:
        raise ValueError(f"ChannelPrune: {what} needs calib_data or forward_loop (activations)")
    layers = {n: m for n, m in model.named_modules() if _reads_features(m) is not None}
    sums: Dict[str, list] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach()
            width = _reads_features(mod)[1]
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):  # [B, C, *spatial] (or unbatched): channels last
                rows = (x if x.dim() == mod.weight.dim() else x.unsqueeze(0)).movedim(1, -1).reshape(-1, width)
            else:
                rows = token_mask.rows(x, width)
            rows = rows.double()
            got = [(rows * rows).sum(0).cpu(), rows.sum(0).cpu(), rows.shape[0]]
            sums[name] = [a + b for a, b in zip(sums[name], got)] if name in sums else got
        return fn

    loop = make_forward_loop([calib_data] if isinstance(calib_data, torch.Tensor) else calib_data, forward_loop,
                             progress=False)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        loop(model)
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise ValueError(f"ChannelPrune: {what} saw no layer run (empty calib_data, or a forward_loop that did "
                         f"not run the model)")
    for n, (sq, _, _) in sums.items():
        if not torch.isfinite(sq).all():
            raise ValueError(f"ChannelPrune: layer '{n}': its calibration inputs contain NaN or Inf")
    return InputStats({n: sq.sqrt() for n, (sq, _, _) in sums.items()},
                      {n: s / max(count, 1) for n, (_, s, count) in sums.items()
                       if not isinstance(layers[n], (nn.Conv1d, nn.Conv2d))})


def wanda_columns(sl, mods: Dict[str, nn.Module], norms: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """|W_ij| * ||X_j||_2 of a consumer slice, in the weight's shape with the input features
    moved to dim 1; None for the other slices (a producer's rows, a bias, a norm's scale)."""
    m = mods[sl.module]
    reads = _reads_features(m)
    if sl.param != "weight" or reads is None or sl.dim != reads[0] or sl.module not in norms:
        return None
    w = m.weight.detach().double().abs().movedim(reads[0], 1)
    return w * norms[sl.module].reshape((1, -1) + (1,) * (w.dim() - 2))


def bias_shifts(mods: Dict[str, nn.Module], removed: Dict[Tuple[str, str, int], list],
                means: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{consumer name: W[:, removed] @ mean(X[removed])} (float64, [out]): what the removed input
    features contributed on average, for the consumer's bias to keep (FLAP's compensation, An et
    al. 2024). Consumers the data never ran, and convs, get none."""
    shifts: Dict[str, torch.Tensor] = {}
    for (name, param, dim), idx in removed.items():
        m = mods[name]
        reads = _reads_features(m)
        if param != "weight" or reads is None or dim != reads[0] or name not in means:
            continue
        cols = torch.tensor(sorted(set(idx)), dtype=torch.int64)
        w = m.weight.detach().double().cpu().movedim(reads[0], 1)  # [out, in]
        shifts[name] = shifts.get(name, 0) + w[:, cols] @ means[name][cols]
    return shifts
