"""Loading a compressed model without first allocating the float model it replaces.

    with ts.empty_parameters():
        model = MyModel()          # parameters on the meta device, buffers computed as usual
    ts.load(model, "model.slim.safetensors")

A 7B-parameter float model is 28 GB in fp32; its INT4 file is under 4 GB. Built the usual way,
the float weights are allocated and initialized only to be replaced. Built inside
`empty_parameters()`, each parameter moves to the meta device as it is registered (allocated
once, uninitialized, then freed; its initialization runs on meta); buffers (rotary position
tables, BatchNorm statistics) are computed as in a normal build, since a file need not hold
them. ts.load then gives each remaining meta parameter the file's tensor itself. (`torch.device("meta")` puts buffers there too: their values would be
lost, so ts.load refuses such a model.)
"""
import contextlib
from typing import Callable, Dict

import torch
from torch import nn


@contextlib.contextmanager
def empty_parameters():
    """Modules built inside keep their parameters on the meta device; see the module docstring.
    It replaces nn.Module.register_parameter while the block runs, for every thread: build
    nothing else concurrently."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        # plain parameters only: an uninitialized one (nn.LazyLinear) or a subclass stays as built
        if type(param) is nn.Parameter and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def take_meta_parameters(model: nn.Module, state: Dict[str, torch.Tensor]) -> Callable[[], None]:
    """Every parameter of `model` on the meta device becomes the tensor `state` holds for it
    (nothing copied where the dtype matches); one held under several names (tied weights, saved
    once) stays one parameter, taken from whichever name `state` holds. Returns the undo. Its
    errors are ValueErrors the caller prefixes with the file's name."""
    names: Dict[int, list] = {}
    params: Dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type == "meta":
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
    modules = dict(model.named_modules(remove_duplicate=False))
    planned = []
    for pid, keys in names.items():
        key = next((k for k in keys if k in state), None)
        if key is None:
            raise ValueError(f"the model's '{keys[0]}' is on the meta device and the file holds no tensor for it")
        meta, t = params[pid], state[key]
        if tuple(t.shape) != tuple(meta.shape):
            raise ValueError(f"'{key}' is {list(t.shape)} in the file, the model's {list(meta.shape)}")
        new = nn.Parameter(t.to(meta.dtype), requires_grad=meta.requires_grad)
        planned += [(modules[k.rpartition(".")[0]], k.rpartition(".")[2], meta, new) for k in keys]
    for module, attr, _, new in planned:  # all checked first: nothing half-done on an error
        module._parameters[attr] = new

    def undo():
        for module, attr, meta, _ in planned:
            module._parameters[attr] = meta
    return undo
