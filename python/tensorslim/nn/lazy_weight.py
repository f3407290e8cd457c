"""The `.weight` of a compressed layer, dequantized only when its values are used.

Model code reads `layer.weight` for its metadata on every forward: transformers' T5 feed-forward
compares `wo.weight.dtype` with its hidden states twice per layer, ViT and CLIP read the patch
conv's `weight.dtype`, CLIP the position table's `weight.shape[0]`. Each read used to dequantize
the whole matrix: a T5 3072 -> 768 INT8 layer spent 0.73 ms per read against 0.06 ms in its
kernel. A LazyWeight knows its shape, dtype and device at once and computes its values on the
first operation that needs them (any torch function, `.numpy()`, printing, pickling, reading its
storage), once per object; what that operation returns is an ordinary tensor.
"""
from typing import Callable, Optional

import torch
from torch.utils._pytree import tree_map

from ..ops import _eager


class LazyWeight(torch.Tensor):
    # transformers' from_pretrained re-initializes weights it did not load (T5's q / k / v) in
    # place through transformers.initialization, which skips tensors carrying this flag: a
    # value computed from loaded packed tensors needs no initialization (and refuses in-place writes)
    _is_hf_initialized = True

    @staticmethod
    def __new__(cls, compute: Callable[[], torch.Tensor], shape, dtype: torch.dtype, device):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=device, requires_grad=False)
        t._compute, t._value = compute, None
        return t

    def __init__(self, *args, **kwargs):
        super().__init__()

    def materialize(self) -> torch.Tensor:
        if self._value is None:
            value = self._compute()
            if value.shape != self.shape or value.dtype != self.dtype or value.device != self.device:
                raise RuntimeError(f"LazyWeight: computed {value.dtype} {tuple(value.shape)} on {value.device}, "
                                   f"announced {self.dtype} {tuple(self.shape)} on {self.device}")
            self._value, self._compute = value, None  # the layer is no longer held
        return self._value

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func._schema.is_mutable and _writes_a_layer_weight(func, args, kwargs or {}):
            raise RuntimeError(
                f"{func.__name__.split('.')[0]}: the .weight of a compressed layer (or the .bias of a half one) is "
                f"read-only, computed from its stored tensors; an in-place change would edit only a copy and "
                f"leave the layer as it was. Change the float model before compressing it, or train a copy: "
                f"nn.Parameter(layer.weight.clone()); a bias trains as layer.bias = nn.Parameter(layer.bias.float())")
        def plain(a):
            return a.materialize() if isinstance(a, LazyWeight) else a
        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))

    __torch_function__ = torch._C._disabled_torch_function_impl

    def requires_grad_(self, requires_grad: bool = True):
        """A half layer's `.bias` passes this on to the stored float32 bias (which the layer then
        hands out itself: BitFit trains it in float32); on a `.weight` a gradient would reach
        only this copy, never the layer."""
        source = getattr(self, "_source", None)
        if source is not None:  # returned, so `SGD([layer.bias.requires_grad_()])` trains it
            return source.requires_grad_(requires_grad)
        if requires_grad and not (getattr(self, "_is_param", False) or getattr(self, "_detached", False)):
            raise RuntimeError("requires_grad_: the .weight of a compressed layer is a computed copy; a gradient "
                               "would never reach the layer. Train a copy: nn.Parameter(layer.weight.clone())")
        return super().requires_grad_(requires_grad)

    # Tensor methods that do not reach the dispatcher, or read the storage a wrapper lacks: they
    # act on the computed values (safetensors reads data_ptr; share_memory_ crashed on the wrapper).
    def data_ptr(self):
        return self.materialize().data_ptr()

    def untyped_storage(self):
        return self.materialize().untyped_storage()

    def storage(self):
        return self.materialize().storage()

    def share_memory_(self):
        self.materialize().share_memory_()
        return self

    def is_shared(self):
        return self.materialize().is_shared()

    def is_pinned(self, *args, **kwargs):
        return self.materialize().is_pinned(*args, **kwargs)

    def pin_memory(self, *args, **kwargs):
        return self.materialize().pin_memory(*args, **kwargs)

    def __dlpack__(self, *args, **kwargs):
        return self.materialize().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.materialize().__dlpack_device__()

    def detach(self):
        """A LazyWeight again (the same values, computed once for both): nn.Parameter(layer.weight)
        takes a tensor subclass only if detach() keeps its type. Such a parameter trains (its
        values live in the computed tensor) and saves as a plain tensor."""
        t = LazyWeight(self.materialize, self.shape, self.dtype, self.device)
        t._detached = True  # its own values (nn.Parameter(layer.weight) calls detach().requires_grad_())
        return t

    def numpy(self, *args, **kwargs):
        return self.materialize().numpy(*args, **kwargs)

    def tolist(self):
        return self.materialize().tolist()

    def __repr__(self, *args, **kwargs):
        return repr(self.materialize())

    def __reduce_ex__(self, protocol):
        return self.materialize().__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        value = self.materialize().clone()
        if getattr(self, "_is_param", False):  # nn.Parameter(layer.weight) held by a module
            return torch.nn.Parameter(value, requires_grad=self.requires_grad)
        return value

    def __array__(self, dtype=None, copy=None):
        value = self.materialize().numpy()
        return value if dtype is None else value.astype(dtype, copy=bool(copy))


def _writes_a_layer_weight(func, args, kwargs) -> bool:
    """Whether the op writes into a LazyWeight a layer handed out (not an nn.Parameter made
    from one, which trains in its computed values)."""
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, LazyWeight) and not getattr(value, "_is_param", False):
            return True
    return False


def lazy_weight(compute: Callable[[], torch.Tensor], shape, dtype: torch.dtype, device,
                source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """compute() as a LazyWeight in eager code; computed at once where a tracer reads it
    (torch.compile, torch.export, torch.jit), which needs ordinary tensors. source: the stored
    tensor requires_grad_ acts on (a half layer's bias)."""
    if _eager.tracing():
        return compute()
    t = LazyWeight(compute, shape, dtype, device)
    t._source = source
    return t
