"""Eager calls that skip torch.library's dispatcher when it has nothing to do.

A custom op call passes the dispatcher, its autograd wrapper and torch.compile's frame hooks:
about 50-90 us per call on the CPUs we test, more than the whole kernel of a small layer
(MiniLM's 384 x 384 GEMV takes ~10 us), so a compressed model paid it once per layer.
Where none of that machinery has work to do (eager mode, plain CPU tensors, no gradient to
record, no dispatch or function mode, no functorch transform) the op's CPU function is called
directly: the same function the dispatcher would reach, with the same arguments.
"""
import contextlib

import torch
from torch.autograd import forward_ad

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def tracing() -> bool:
    """torch.compile / torch.export / torch.jit is tracing the code that runs."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def direct_ok(args) -> bool:
    if tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # torch.func: ops return wrapped tensors
        return False
    if forward_ad._current_level >= 0:  # dual tensors: the direct call would drop their tangents
        return False
    grad = torch.is_grad_enabled()
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for a in args:
        # is_cpu, not device.type: no torch.device object per tensor (this runs per layer call).
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or not a.is_cpu or
                                            (grad and a.requires_grad) or wrapped(a)):
            return False
    return True


def call(op, impl, *args):
    """op(*args) through the dispatcher, or impl(*args) (op's CPU function) where that is the
    same computation without the dispatcher's cost."""
    return impl(*args) if direct_ok(args) else op(*args)


@contextlib.contextmanager
def untraced():
    """Derived data (packed weights) built under torch.jit.trace or a dispatch mode (make_fx):
    kept out of the trace, which then holds it as a constant (recorded, it replayed as the
    uninitialized torch.empty the native packing had filled outside the trace), or under a
    torch.func transform (whose tensors have no storage the core could write)."""
    from torch.utils._python_dispatch import _disable_current_modes

    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with _disable_current_modes(), torch._C._DisableFuncTorch():
            yield
    finally:
        torch._C._set_tracing_state(state)


def is_plain(t: torch.Tensor) -> bool:
    """A real tensor whose data the core may read (not fake, meta or functorch-wrapped)."""
    return type(t) in _PLAIN and not t.is_meta and not torch._C._functorch.is_functorch_wrapped_tensor(t)
