"""Feeding calibration data to a model: `calib_data` or a `forward_loop(model)` callable.

Every calibrating technique receives one normalized `forward_loop(model)`; it attaches its
own hooks (observers, block capture) and calls the loop.
"""
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .._user_warning import warn_user
from . import token_mask

ForwardLoop = Callable[[nn.Module], None]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def model_arguments(model: nn.Module, batch: Any) -> Tuple[tuple, dict]:
    """(args, kwargs) of model(batch), model(*batch) or model(**batch), tensors on the model's device."""
    batch = _to_device(batch, model_device(model))
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), batch
    raise TypeError(f"calib_data items must be tensors, tuples/lists or dicts of model inputs, "
                    f"got {type(batch).__name__}")


def call_model(model: nn.Module, batch: Any) -> Any:
    """model(batch), model(*batch) or model(**batch), with tensors moved to the model's device."""
    args, kwargs = model_arguments(model, batch)
    return model(*args, **kwargs)


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for b in batch:
            yield from _tensors(b)
    elif isinstance(batch, dict) or hasattr(batch, "items"):
        for b in batch.values():
            yield from _tensors(b)


class _DataCheck:
    """What calibration cannot work with: a batch with no rows (an error: statistics of nothing
    are NaN), or float inputs that are all zero in every batch (a warning: every range and
    Hessian is degenerate, so the quantized model would be useless)."""

    def __init__(self):
        self.saw_float, self.saw_nonzero = False, False

    def batch(self, index: int, batch: Any) -> None:
        tensors = list(_tensors(batch))
        if tensors and all(t.numel() == 0 for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"calib_data batch {index} is empty (shapes {shapes}); every batch needs "
                             f"at least one row")
        floats = [t for t in tensors if t.is_floating_point()]
        self.saw_float |= bool(floats)
        if not self.saw_nonzero:  # one reduction per batch until a nonzero value shows up
            self.saw_nonzero = any(bool(t.ne(0).any()) for t in floats)

    def done(self) -> None:
        if self.saw_float and not self.saw_nonzero:
            warnings.warn("calib_data: every floating-point input is all zeros; the calibrated ranges "
                          "are degenerate and the quantized model will be useless. Calibrate on real "
                          "(or at least representative random) inputs", UserWarning, stacklevel=4)


@contextmanager
def eval_mode(model: nn.Module):
    """Calibration sees the model as inference does: no BatchNorm statistics moved, no dropout
    (in training mode a calibration pass changed the model, even one that then failed). Each
    module's own mode comes back after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def make_forward_loop(calib_data: Optional[Iterable] = None,
                      forward_loop: Optional[ForwardLoop] = None,
                      progress: bool = True, desc: str = "calibrating") -> Optional[ForwardLoop]:
    """One callable that runs the calibration data through a model (None if there is none), in
    eval mode."""
    if calib_data is not None and forward_loop is not None:
        raise ValueError("pass calib_data or forward_loop, not both")
    if forward_loop is not None:
        if not callable(forward_loop):
            raise TypeError(f"forward_loop must be callable as forward_loop(model), "
                            f"got {type(forward_loop).__name__}")

        def user_loop(model: nn.Module) -> None:
            with eval_mode(model):
                forward_loop(model)

        return user_loop
    if calib_data is None:
        return None
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise TypeError("calib_data must be an iterable of batches (e.g. a list of tensors or a "
                        "DataLoader), not a single tensor/dict; wrap it in a list")
    calib_data = reusable(calib_data)

    def loop(model: nn.Module) -> None:
        # an encoder-decoder's decoder positions are not the attention mask's (same length or not),
        # also inside a wrapper of the user's
        encoder_decoder = any(getattr(getattr(m, "config", None), "is_encoder_decoder", False)
                              for m in model.modules())
        count = 0
        total = len(calib_data) if hasattr(calib_data, "__len__") else None
        check = _DataCheck()
        with torch.no_grad(), eval_mode(model):
            for batch in tqdm(calib_data, desc=desc, total=total, disable=not progress, leave=False):
                check.batch(count, batch)
                try:
                    with token_mask.padding(None if encoder_decoder else token_mask.of_batch(batch)):
                        call_model(model, batch)
                except RuntimeError as e:  # e.g. a shape the model does not take
                    raise ValueError(f"calib_data batch {count} does not run through the model: "
                                     f"{e}") from e
                count += 1
        if count == 0:
            raise ValueError("calib_data is empty: calibration needs at least one batch")
        check.done()

    return loop


def reusable(calib_data):
    """calib_data as an iterable that runs more than once: a generator becomes a list (verbs
    run the data once per pass, and a second pass over a spent generator saw nothing)."""
    if calib_data is None or isinstance(calib_data, torch.Tensor):
        return calib_data
    try:
        return list(calib_data) if iter(calib_data) is calib_data else calib_data
    except TypeError:
        raise TypeError(f"calib_data must be iterable, got {type(calib_data).__name__}") from None


UNREACHED_NOTE = "never ran on the calibration data"  # a fallback's Report note, in brackets
NEVER_RAN = f"{UNREACHED_NOTE}: nothing to calibrate on"  # a skipped layer's Report reason


@dataclass
class Reach:
    """How many layers a calibration pass hooked, and the ones it never ran."""

    targets: int = 0
    missed: List[str] = field(default_factory=list)


def settle_unreached(cfg, technique: str, *reaches: Reach) -> None:
    """After the calibration passes of one call: raise naming the layers they never ran under
    cfg.unreached == "error", or where they ran none at all (a forward loop that does not run
    the model); else warn about them."""
    missed = [n for r in reaches for n in r.missed]
    if cfg.unreached == "error" or (missed and len(missed) == sum(r.targets for r in reaches)):
        check_reached(missed)
    warn_unreached(technique, missed, cfg.unreached)


def warn_unreached(technique: str, names: List[str], mode: str) -> None:
    """The RuntimeWarning naming the layers the calibration data never ran, under the config's
    `unreached` "fallback" or "skip" (tensorslim.config.check_calibration_fields)."""
    if names:
        fate = "got the data-free fallback (see the Report)" if mode == "fallback" else "stay float"
        warn_user(f"{technique}: {len(names)} layer(s) never ran on the calibration data and {fate}: {names}",
                  RuntimeWarning)


def check_reached(unreached) -> None:
    """A ValueError naming every layer (of one pass) the calibration data never reached, with the
    exclude list that skips them, so that one error gives the whole fix."""
    names = list(unreached)
    if not names:
        return
    shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    layers, them = ("layers", "them") if len(names) > 1 else ("layer", "it")
    raise ValueError(f"{layers} {shown}: the calibration data never reached {them} (a branch not taken, an "
                     f"expert no calibration token was routed to, or model code using the .weight instead of "
                     f"calling the layer); exclude {them} "
                     f"(exclude={names!r}) or use data that exercises {them}")


def require_forward_loop(loop: Optional[ForwardLoop], technique: str) -> ForwardLoop:
    if loop is None:
        raise ValueError(f"{technique} needs calibration data: pass calib_data=[batches...] "
                         f"or forward_loop=fn(model)")
    return loop
