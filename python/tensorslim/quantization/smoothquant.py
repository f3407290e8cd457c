"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

For a linear layer y = x W^T, per input channel j:  s_j = max|X_j|^a / max|W_j|^(1-a),
x' = x / s, W' = W * s, so x' W'^T = x W^T and x' has a flatter range across channels.

This module holds the pieces the W8A8 transform (w8a8.py) puts together:
  smooth_factors       s from channel statistics and a migration strength alpha
  search_alpha         per layer (group), the alpha minimizing the quantized output's MSE
  trace_producers      which module produced each linear layer's input (forward hooks)
  foldable_kind        whether a producer can absorb 1/s (norm with an elementwise weight,
                       or a linear layer's output rows)
  fold_is_exact        proves a fold is valid on a real batch: scale by powers of two
                       (exact in floating point) and require the model output unchanged;
                       a producer whose output also feeds something else (a residual add)
                       changes the output and is rejected
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._identity import tensor_identity
from ..transforms import float_weight

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def smooth_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel; 1 where a channel is all zero."""
    x = x_absmax.double()
    w = w_absmax.double()
    ok = (x > 0) & (w > 0)
    s = torch.where(ok, x.clamp(min=1e-30) ** alpha / w.clamp(min=1e-30) ** (1 - alpha), torch.ones_like(x))
    return s.clamp(min=1e-5, max=1e5).float()


def _fake_quant_rows(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Symmetric int8 per output row with codes up to qmax, as Int8Linear stores weights."""
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-30)
    return torch.round(w / scale).clamp(-qmax, qmax) * scale


def fake_quant_act(x: torch.Tensor, mode: str, lo: Optional[float] = None, hi: Optional[float] = None,
                   symmetric: bool = False) -> torch.Tensor:
    """Activation quantization as the kernels do it: static per tensor over [lo, hi], or per token."""
    if mode == "dynamic":
        scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
        return torch.round(x / scale).clamp(-127, 127) * scale
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(-lo, hi) / 127 or 1.0
        return torch.round(x / scale).clamp(-128, 127) * scale
    scale = (hi - lo) / 255 or 1.0
    zp = float(round(-lo / scale))
    return (torch.round(x / scale) + zp).clamp(0, 255).sub(zp) * scale


def quantized_output_mse(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor, mode: str,
                         x_min: torch.Tensor, x_max: torch.Tensor, symmetric: bool = False,
                         refs: Optional[Sequence[torch.Tensor]] = None, weight_qmax: int = 127) -> float:
    """Mean squared error of the W8A8 outputs of every layer of a group, smoothed by s
    (refs: the float outputs x @ w.T, when already computed)."""
    xs = x / s
    lo = float((x_min / s).min()) if mode == "static" else None
    hi = float((x_max / s).max()) if mode == "static" else None
    xq = fake_quant_act(xs, mode, lo, hi, symmetric)
    err, n = 0.0, 0
    for i, w in enumerate(weights):
        ref = refs[i] if refs is not None else x @ w.T
        got = xq @ _fake_quant_rows(w * s, weight_qmax).T
        err += float(((ref - got) ** 2).sum())
        n += ref.numel()
    return err / max(n, 1)


def search_alpha(x: torch.Tensor, weights: Sequence[torch.Tensor], x_min: torch.Tensor, x_max: torch.Tensor,
                 mode: str, symmetric: bool = False, grid: Sequence[float] = ALPHA_GRID,
                 weight_qmax: int = 127) -> Tuple[float, Dict[float, float]]:
    """The alpha of `grid` whose smoothing gives the lowest output MSE on the sample x [n, K].

    Static mode scores generalization, not fit: s and the activation range come from the even
    rows of the sample and the error is measured on the odd rows. Scoring on rows inside the range
    favours alpha -> 1, which flattens every channel to exactly the calibrated edge, so that
    unseen data clips in all of them (on a synthetic block: best on the calibration data,
    10x the error on new data)."""
    x = x.float()
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    x_absmax = torch.maximum(-x_min, x_max)
    if mode == "static" and x.shape[0] >= 2:
        fit, x = x[0::2], x[1::2]
        r_min, r_max = fit.amin(0), fit.amax(0)
        x_absmax = torch.maximum(-r_min, r_max)
    else:
        r_min, r_max = x_min, x_max
    refs = [x @ w.T for w in weights]
    errors = {}
    for a in grid:
        s = smooth_factors(x_absmax, w_absmax, a)
        errors[a] = quantized_output_mse(x, weights, s, mode, r_min, r_max, symmetric, refs, weight_qmax)
    best = min(errors, key=lambda a: (errors[a], abs(a - 0.5)))
    return best, errors


# ---------------------------------------------------------------- structure and folding


def foldable_kind(module: nn.Module, channels: int) -> Optional[str]:
    """'norm' for a leaf with an elementwise weight [channels] (and bias) such as LayerNorm /
    RMSNorm, 'linear' for an nn.Linear with `channels` outputs, else None."""
    if isinstance(module, nn.Linear):
        return "linear" if module.out_features == channels else None
    if list(module.children()):
        return None
    w = float_weight(module)
    b = getattr(module, "bias", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == channels and w.dtype.is_floating_point:
        if b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape):
            return "norm"
    return None


def _small_batch(args: tuple, kwargs: dict, rows: int = 2) -> Tuple[tuple, dict]:
    """The model inputs, detached; cut to the first `rows` samples when every tensor input has
    the same leading (batch) size, so that checking folds costs little."""
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    cut = len(sizes) == 1 and None not in sizes and next(iter(sizes)) > rows

    def prep(v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.detach()
        return v[:rows].clone() if cut else v

    return tuple(prep(a) for a in args), {k: prep(v) for k, v in kwargs.items()}


class ProducerTrace:
    """Records, during the first forward pass of a model, which leaf module produced each
    traced layer's input tensor, which traced layers share an input, the execution order,
    and the model's inputs (to re-run that batch when checking folds)."""

    def __init__(self, model: nn.Module, traced: Dict[str, nn.Module]):
        self.model = model
        self.traced = traced
        self.order: List[str] = []
        self.input_of: Dict[str, int] = {}  # traced name -> id of its input tensor
        self.input_version: Dict[str, int] = {}  # traced name -> its input's in-place version then
        self.producer_of_id: Dict[int, Tuple[str, int]] = {}  # output id -> (producer, version)
        self.batch: Optional[Tuple[tuple, dict]] = None
        self._keep: List[torch.Tensor] = []  # holds tensors so ids are not reused
        self._handles = []
        self.done = False

    def __enter__(self):
        traced_ids = {id(m) for m in self.traced.values()}
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post))
        for name, mod in self.model.named_modules():
            if not name or list(mod.children()):
                continue
            self._handles.append(mod.register_forward_hook(self._make_post(name)))
            if id(mod) in traced_ids:
                self._handles.append(mod.register_forward_pre_hook(self._make_pre(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._keep.clear()

    def _root_pre(self, module, args, kwargs):
        if self.batch is None:
            self.batch = _small_batch(args, kwargs)

    def _root_post(self, module, args, output):
        if not self.done:
            self.done = True
            self._keep.clear()

    def _make_post(self, name):
        def hook(module, args, output):
            if not self.done and isinstance(output, torch.Tensor):
                self.producer_of_id[id(output)] = (name, tensor_identity(output)[1])
                self._keep.append(output)
        return hook

    def _make_pre(self, name):
        def hook(module, args):
            if not self.done and args and isinstance(args[0], torch.Tensor) and name not in self.input_of:
                self.input_of[name] = id(args[0])
                self.input_version[name] = tensor_identity(args[0])[1]
                self._keep.append(args[0])
                self.order.append(name)
        return hook

    def groups(self) -> List[Tuple[List[str], Optional[str]]]:
        """[(traced layers sharing one input tensor, in execution order; producer name or None)]."""
        by_id: Dict[int, List[str]] = {}
        for name in self.order:
            by_id.setdefault(self.input_of[name], []).append(name)
        groups = []
        for i, names in by_id.items():
            producer, version = self.producer_of_id.get(i, (None, None))
            # changed in place in between (bn(F.relu(conv(x), inplace=True))): not the
            # producer's output as it made it, so nothing folds into the producer
            if producer is not None and self.input_version[names[0]] != version:
                producer = None
            groups.append((names, producer))
        return groups


def _collect_tensors(out: Any, acc: List[torch.Tensor]) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        acc.append(out)
    elif isinstance(out, (tuple, list)):
        for o in out:
            _collect_tensors(o, acc)
    elif isinstance(out, dict) or hasattr(out, "values"):
        for o in out.values():
            _collect_tensors(o, acc)
    return acc


@torch.no_grad()
def _run(model: nn.Module, batch: Tuple[tuple, dict]) -> List[torch.Tensor]:
    """The model's float outputs on a copy of the batch's tensors (a forward may write into
    its input, which would change the batch for the next run of a check)."""
    args, kwargs = batch
    copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
    out = model(*(copy(a) for a in args), **{k: copy(v) for k, v in kwargs.items()})
    return [t.detach().clone() for t in _collect_tensors(out, []) if t.is_floating_point()]


@torch.no_grad()
def fold_is_exact(model: nn.Module, batch: Tuple[tuple, dict], producer: nn.Module, kind: str,
                  consumers: Sequence[nn.Linear], reference: Optional[List[torch.Tensor]] = None,
                  seed: int = 0) -> bool:
    """Whether dividing the producer's output channels by s and multiplying the consumers'
    input columns by s leaves the model's output unchanged. s is a random power of two per
    channel, so a valid fold is exact in floating point; anything else that reads the
    producer's output (a residual, a non-smoothed layer) makes the output differ."""
    K = consumers[0].in_features
    g = torch.Generator().manual_seed(seed)
    t = 2.0 ** (torch.randint(0, 2, (K,), generator=g).float() * 2 - 1)  # 0.5 or 2
    ref = reference if reference is not None else _run(model, batch)
    saved = []

    def scale_(tensor: torch.Tensor, factor: torch.Tensor):
        saved.append((tensor, tensor.detach().clone()))
        tensor.mul_(factor.to(tensor.dtype))

    try:
        if kind == "norm":
            scale_(producer.weight, 1 / t)
            if getattr(producer, "bias", None) is not None:
                scale_(producer.bias, 1 / t)
        else:
            scale_(producer.weight, (1 / t)[:, None])
            if producer.bias is not None:
                scale_(producer.bias, 1 / t)
        for c in consumers:
            scale_(c.weight, t[None, :])
        got = _run(model, batch)
    finally:
        for tensor, old in reversed(saved):
            tensor.copy_(old)
    return outputs_match(ref, got, 1e-5)


def outputs_match(ref: List[torch.Tensor], got: List[torch.Tensor], rel: float, floor: float = 0.0) -> bool:
    """Whether a model's outputs (as _run gives them) are the reference's: same count and
    shapes, and every element within rel * max|reference| + floor."""
    if len(got) != len(ref):
        return False
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            return False
        if r.numel() and float((r.float() - g.float()).abs().max()) > rel * float(r.float().abs().max()) + floor:
            return False
    return True


__all__ = ["smooth_factors", "search_alpha", "quantized_output_mse", "fake_quant_act", "foldable_kind",
           "ProducerTrace", "fold_is_exact", "ALPHA_GRID"]
