"""Feeding calibration data to a model: `calib_data` or a `forward_loop(model)` callable.

Every calibrating technique receives one normalized `forward_loop(model)`; it attaches its
own hooks (observers, block capture) and calls the loop.
"""
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

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


def call_model(model: nn.Module, batch: Any) -> Any:
    """model(batch), model(*batch) or model(**batch), with tensors moved to the model's device."""
    batch = _to_device(batch, model_device(model))
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(f"calib_data items must be tensors, tuples/lists or dicts of model inputs, "
                    f"got {type(batch).__name__}")


def make_forward_loop(calib_data: Optional[Iterable] = None,
                      forward_loop: Optional[ForwardLoop] = None,
                      progress: bool = True, desc: str = "calibrating") -> Optional[ForwardLoop]:
    """One callable that runs the calibration data through a model (None if there is none)."""
    if calib_data is not None and forward_loop is not None:
        raise ValueError("pass calib_data or forward_loop, not both")
    if forward_loop is not None:
        if not callable(forward_loop):
            raise TypeError(f"forward_loop must be callable as forward_loop(model), "
                            f"got {type(forward_loop).__name__}")
        return forward_loop
    if calib_data is None:
        return None
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise TypeError("calib_data must be an iterable of batches (e.g. a list of tensors or a "
                        "DataLoader), not a single tensor/dict; wrap it in a list")
    try:
        iter(calib_data)
    except TypeError:
        raise TypeError(f"calib_data must be iterable, got {type(calib_data).__name__}") from None

    def loop(model: nn.Module) -> None:
        count = 0
        total = len(calib_data) if hasattr(calib_data, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(calib_data, desc=desc, total=total, disable=not progress, leave=False):
                try:
                    call_model(model, batch)
                except RuntimeError as e:  # e.g. a shape the model does not take
                    raise ValueError(f"calib_data batch {count} does not run through the model: "
                                     f"{e}") from e
                count += 1
        if count == 0:
            raise ValueError("calib_data is empty: calibration needs at least one batch")

    return loop


def require_forward_loop(loop: Optional[ForwardLoop], technique: str) -> ForwardLoop:
    if loop is None:
        raise ValueError(f"{technique} needs calibration data: pass calib_data=[batches...] "
                         f"or forward_loop=fn(model)")
    return loop
