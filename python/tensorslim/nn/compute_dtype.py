"""What a module holding packed weights does on .half() / .to(dtype): it changes the dtype it
computes in, and its codes, scales and bias keep theirs (shared by the compressed linears and
the quantized embedding tables)."""
from typing import Optional

import torch
from torch import nn

# The dtypes a compressed layer computes in (its kernels take and return these).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def target_dtype(module: nn.Module, fn, current: torch.dtype) -> torch.dtype:
    """The float dtype Module._apply's fn converts to (current where it converts none); a
    TypeError naming the module where a packed layer cannot compute in it (float64)."""
    device = next((b.device for b in module.buffers(recurse=False)), torch.device("cpu"))
    target = fn(torch.empty(0, dtype=current, device=device)).dtype
    if target != current and target not in COMPUTE_DTYPES:
        raise TypeError(f"{type(module).__name__}: cannot compute in {target}; a compressed layer computes in "
                        f"float32, bfloat16 or float16 (its packed weights keep their format)")
    return target


def keeping_dtypes(fn):
    """fn for Module._apply that moves tensors but keeps every dtype (never through fp16 / bf16
    and back: scales and biases would come back rounded)."""
    def keep_dtype(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        return out if out.dtype == t.dtype else t.to(device=out.device)
    return keep_dtype


ABSENT = object()  # held_bias of a module that registered no bias


def held_bias(module: nn.Module, absent=None):
    """The bias as the module holds it: the parameter it was made into for training, else its
    buffer (None where the layer has no bias; `absent` where none was registered)."""
    held = module.__dict__
    return held["_parameters"]["bias"] if "bias" in held["_parameters"] else held["_buffers"].get("bias", absent)


def kernel_bias(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The float32 bias the kernels add: one set in a half dtype (`layer.bias =
    nn.Parameter(layer.bias)` in a half model) as a float32 value (gradients flow back to it)."""
    return bias if bias is None or bias.dtype == torch.float32 else bias.float()


def stored_bias(module: nn.Module) -> Optional[torch.Tensor]:
    """The bias a packed layer's kernels take, whatever the compute dtype."""
    return kernel_bias(held_bias(module))


class BiasInComputeDtype:
    """`.bias` as model code reads it, in the dtype of `.weight`: a half model's code calling
    F.linear(x, layer.weight, layer.bias) or F.conv1d(x, conv.weight, conv.bias) itself (Mamba's
    causal conv) got a float32 bias beside half tensors ("Input type Half and bias type float").
    The stored bias stays float32 (stored_bias); in a half / bf16 layer this is a read-only
    copy in that dtype (a LazyWeight: in-place writes raise, as for `.weight`, instead of
    changing a copy; its requires_grad_ acts on the stored bias), except where the bias trains
    (re-set as a Parameter, or requires_grad): that one is returned itself, in its own dtype
    (model code adding a float32 trained bias to half tensors fails as before). AttributeError
    where no bias was registered, so nn.Module's own checks (bias made a Parameter) still pass."""

    def __init__(self, dtype_attribute: str):
        self.dtype_attribute = dtype_attribute

    def __get__(self, module, owner=None):
        if module is None:
            return self
        bias = held_bias(module, ABSENT)
        if bias is ABSENT:
            raise AttributeError("bias")
        dtype = module.__dict__.get(self.dtype_attribute)
        if bias is None or dtype is None or bias.dtype == dtype or bias.requires_grad:
            return bias
        from .lazy_weight import lazy_weight

        return lazy_weight(lambda: bias.to(dtype), bias.shape, dtype, bias.device, source=bias)


class KeepsPackedDtypes(nn.Module):
    _compute_dtype: Optional[torch.dtype] = None  # None: float32, inputs' own float dtype kept
    bias = BiasInComputeDtype("_compute_dtype")

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype or torch.float32

    def _apply(self, fn, recurse=True):
        """module.half() / .to(dtype) / .cuda() / ...: moves every buffer where fn says, but a
        dtype change only sets the compute dtype; codes, scales and bias keep their dtypes."""
        current = self.compute_dtype
        target = target_dtype(self, fn, current)
        result = super()._apply(keeping_dtypes(fn), recurse)
        if target != current:
            object.__setattr__(self, "_compute_dtype", None if target == torch.float32 else target)
        return result

