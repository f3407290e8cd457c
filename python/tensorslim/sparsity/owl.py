"""OWL, Outlier Weighed Layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity
(OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024): per-block
sparsities for ts.Unstructured(profile="owl").

Each block's outlier share D is the fraction of its weights whose Wanda score |W_ij| * ||X_j||_2
(the input feature's L2 norm over the calibration tokens, on the dense model) exceeds owl_m
times the block's mean score. Blocks with more outliers keep more weights: densities
2 * owl_lambda * (D - min D) / (max D - min D), shifted so that the mean is 1 - sparsity. The
paper takes the plain mean over its equal decoder layers; here the mean is weighted by each
block's weight count, so blocks of unequal size still prune `sparsity` of the weights overall
(equal blocks: the same numbers). Every layer of a block gets the block's sparsity.

Blocks are the calibration pipeline's (a decoder's layers, an nn.Sequential's children); a layer
outside every block is a block of its own, and a model that is one block has one per layer
(one group would leave OWL nothing to compare). A block no calibration batch reaches keeps
`sparsity` and is left out of the comparison; if none is reached, that is an error.
"""
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ..quantization.blockwise import find_blocks, no_cache, plan_layers
from ..quantization.calibrate import eval_mode
from .build import dense_linear
from .calibrated import norms_from_sums, square_sum_hook, wanda_score, zero_sums
from .config import Unstructured


def layer_sparsities(model: nn.Module, cfg: Unstructured, forward_loop: Callable[[nn.Module], None],
                     check: Callable, layer_types: tuple) -> Dict[nn.Module, float]:
    """Each layer ts.sparsify would prune -> its sparsity under OWL (one float pass over the data)."""
    blocks = find_blocks(model)
    _, per_block, outside = plan_layers(model, cfg, blocks, check, layer_types)
    full = lambda block, local: ".".join(p for p in (block, local) if p)  # noqa: E731
    groups: List[Dict[str, nn.Module]] = [{full(b, n): m for n, m in t.items()} for (b, _), t in zip(blocks, per_block)
                                          if t] + [{n: m} for n, m in outside.items()]
    if len(groups) == 1:
        groups = [{n: m} for n, m in groups[0].items()]
    norms = _input_norms(model, {n: m for g in groups for n, m in g.items()}, forward_loop)
    shares, sizes, reached = [], [], []
    for i, g in enumerate(groups):
        ran = [(m, norms[n]) for n, m in g.items() if n in norms]
        if ran:
            shares.append(outlier_share(ran, cfg.owl_m))
            sizes.append(float(sum(m.weight.numel() for m in g.values())))
            reached.append(i)
    if groups and not reached:
        raise ValueError(f"profile 'owl': none of the {sum(map(len, groups))} layers to prune ran on the "
                         f"calibration data: is it empty, or does the forward loop not run the model?")
    sparsity = [cfg.sparsity] * len(groups)
    for i, s in zip(reached, block_sparsities(shares, sizes, cfg.sparsity, cfg.owl_lambda)):
        sparsity[i] = s
    return {m: sparsity[i] for i, g in enumerate(groups) for m in g.values()}


def outlier_share(layers: List[Tuple[nn.Module, torch.Tensor]], owl_m: float) -> float:
    """The fraction of the layers' weights whose Wanda score exceeds owl_m times the mean score
    over all of them (the layers of one block, with their input norms)."""
    total, count = 0.0, 0
    for layer, norms in layers:
        total += float(wanda_score(layer, dense_linear(layer)[0], norms).sum())
        count += layer.weight.numel()
    threshold = owl_m * total / count
    above = sum(int((wanda_score(layer, dense_linear(layer)[0], norms) > threshold).sum()) for layer, norms in layers)
    return above / count


def block_sparsities(shares: List[float], sizes: List[float], sparsity: float, owl_lambda: float) -> List[float]:
    """OWL's sparsity per block from its outlier share: densities spread over 2 * owl_lambda in
    the order of the shares, their mean weighted by sizes (weights per block) 1 - sparsity."""
    d = torch.tensor(shares, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = d.max() - d.min()
    if spread <= 0:  # one block, or shares all equal: nothing to tell them apart
        return [sparsity] * len(shares)
    density = 2 * owl_lambda * (d - d.min()) / spread
    density = density - (density * w).sum() / w.sum() + (1.0 - sparsity)
    return (1.0 - density).tolist()


def _input_norms(model: nn.Module, layers: Dict[str, nn.Module], forward_loop) -> Dict[str, torch.Tensor]:
    """||X_j||_2 per input column of every layer that ran (by name), over one float pass of the data."""
    sums = zero_sums(layers)
    ran = set()
    handles = [m.register_forward_pre_hook(square_sum_hook(sums, n, ran.add)) for n, m in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model), no_cache(model):
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    return norms_from_sums({n: s for n, s in sums.items() if n in ran})
