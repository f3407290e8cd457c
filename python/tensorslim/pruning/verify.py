"""ChannelPrune's check of its own result: on one example batch, the pruned model must compute
what the original computes with the removed channels zeroed (every removed row, column and
per-channel statistic set to 0, through torch.func.functional_call: the model is not touched).
The removed channels then contribute nothing downstream, so the two agree to float rounding
whenever the channel graph read the model right; a pattern it misread (channels of a residual
addition lined up wrongly, a consumer it did not see) shows up as a different output or a
forward that no longer runs."""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..quantization.calibrate import eval_mode, model_arguments, model_device

# Relative to the largest |value| of each output tensor: float32 sums in another order differ
# by ~1e-6 of that, bfloat16 ones by a step or two of its 2^-8 (a tiny bf16 LLaMA: 0.0014);
# a channel added to the wrong one differs by its whole size.
def _tolerance(dtype: torch.dtype) -> float:
    return max(1e-3, 8 * torch.finfo(dtype).eps)


class ModelRunError(ValueError):
    """The model did not trace, or the pruned model did not give what the original gives with
    the removed channels zeroed: something in the model's code, not a bad argument."""


def rng_devices(device: torch.device) -> List[int]:
    """The CUDA devices whose generators a forward may draw from (for fork_rng)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return [device.index or 0] if device.type == "cuda" else []


def output_tensors(out: Any) -> List[torch.Tensor]:
    """The tensors of a model output (a tensor, tuple / list, dict or Hugging Face ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for o in out.values() for t in output_tensors(o)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in output_tensors(getattr(out, f.name))]
    return []


def _call(model: nn.Module, batch: Any, params=None) -> List[torch.Tensor]:
    device = model_device(model)
    args, kwargs = model_arguments(model, batch)
    # both runs draw the same random numbers (noise or dropout a forward applies in eval mode),
    # and the caller's generator state is left as it was
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(0)
        with torch.no_grad(), eval_mode(model):
            if params is None:
                out = model(*args, **kwargs)
            else:
                # tie_weights=False: a module under two names is one module (its params keyed by
                # the first name); with ties "on", torch 2.13 left the zeroed tensor in place after the call
                out = torch.func.functional_call(model, params, args, kwargs, strict=False, tie_weights=False)
    return [t.detach() for t in output_tensors(out)]


def without_channels(model: nn.Module, batch: Any, removed: Dict[Tuple[str, str, int], List[int]],
                     start: Optional[Dict[str, torch.Tensor]] = None) -> List[torch.Tensor]:
    """The original model's outputs on `batch` with the removed indices of each (module, tensor,
    dim) zeroed; start: tensors (by parameter name) that replace the model's before the zeroing
    (compensated biases, also where a linear had none)."""
    mods = dict(model.named_modules())
    zeroed: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in (start or {}).items()}
    for (name, param, dim), idx in removed.items():
        key = f"{name}.{param}" if name else param
        t = zeroed.get(key)
        if t is None:
            t = getattr(mods[name], param).detach().clone()
        t.index_fill_(dim, torch.tensor(sorted(set(idx)), dtype=torch.int64, device=t.device), 0)
        zeroed[key] = t
    try:
        return _call(model, batch, zeroed)
    except Exception as e:  # the original model ran this batch for the trace: say what failed
        raise ModelRunError(f"ChannelPrune: the example batch does not run through the model with the "
                         f"removed channels zeroed ({type(e).__name__}: {e})") from None


def same_outputs(model: nn.Module, batch: Any, expected: List[torch.Tensor]) -> None:
    """Raises a ValueError unless the (pruned) model's outputs on `batch` match `expected`."""
    advice = ("the channel graph misread this model; leave the layers around it out with exclude=[...] "
              "(the model is unchanged)")
    try:
        got = _call(model, batch)
    except Exception as e:
        raise ModelRunError(f"ChannelPrune: the pruned model no longer runs ({type(e).__name__}: {e}); "
                         f"{advice}") from None
    if len(got) != len(expected):
        raise ModelRunError(f"ChannelPrune: the pruned model returns {len(got)} tensors instead of "
                         f"{len(expected)}; {advice}")
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape or g.dtype != e.dtype:
            if i == 0:
                raise ModelRunError(f"ChannelPrune: output {i} of the pruned model has shape {tuple(g.shape)} "
                                 f"({g.dtype}) instead of {tuple(e.shape)} ({e.dtype}); {advice}")
            continue  # a by-product whose shape follows the channels (attention maps lose heads)
        if not e.is_floating_point() or not e.numel():
            continue  # integers (an argmax) may flip on a near-tie between rounding-close scores
        same = (g == e) | (g.isnan() & e.isnan())  # infinities / NaN where both have them
        diff = float(torch.where(same, 0.0, (g.double() - e.double()).abs()).nan_to_num(float("inf")).max())
        scale = float(e.double().abs().nan_to_num(0.0, 0.0, 0.0).max())
        if diff > _tolerance(e.dtype) * max(scale, 1e-30):
            raise ModelRunError(f"ChannelPrune: output {i} of the pruned model differs from the original "
                             f"without the removed channels by {diff:.3g} (outputs up to {scale:.3g}); "
                             f"{advice}")
