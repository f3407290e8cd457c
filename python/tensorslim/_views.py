"""Tensors cross into the native core as plain view tuples (see src/bindings/views.h)."""
import torch

_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int8: 3,
    torch.uint8: 4,
    torch.int32: 5,
    torch.uint16: 6,
    torch.int64: 7,
}


# A view is (data_ptr, dtype code, shape, strides, device type, device index, stream, tensor):
# the last field is unread by the core; holding the tensor keeps `view(x.contiguous())`'s
# temporary alive for as long as the view exists (the whole native call). A plain tuple: a
# few microseconds per view less than a tuple subclass with an attribute, paid ~7 times per
# layer call.


_PLAIN = (torch.Tensor, torch.nn.Parameter)

# float64 crosses only where a caller asks for it (the distillation losses' reference path);
# every other kernel keeps rejecting it here.
_FLOAT64_CODE = 8


def view(t: torch.Tensor, what: str = "tensor", float64: bool = False) -> tuple:
    if type(t) in _PLAIN and t.is_cpu and not float64:  # the common case, checked cheaply
        code = _DTYPE_CODES.get(t.dtype)
        if code is not None:
            return (t.data_ptr(), code, t.shape, t.stride(), 0, 0, 0, t)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    code = _FLOAT64_CODE if float64 and t.dtype == torch.float64 else _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported by the native core")
    if t.is_cuda:
        stream = torch.cuda.current_stream(t.device).cuda_stream
        return (t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), 1, t.device.index, stream, t)
    if t.device.type != "cpu":
        raise TypeError(f"{what}: device {t.device} is not supported (cpu or cuda; meta tensors "
                        "have no data)")
    return (t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), 0, 0, 0, t)


def optional_view(t, what: str = "tensor"):
    return None if t is None else view(t, what)
