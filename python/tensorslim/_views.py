"""Tensors cross into the native core as plain view tuples (see src/bindings/views.h)."""
import torch

_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int8: 3,
    torch.uint8: 4,
    torch.int32: 5,
}


def view(t: torch.Tensor, what: str = "tensor") -> tuple:
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported by the native core")
    if t.is_cuda:
        stream = torch.cuda.current_stream(t.device).cuda_stream
        return (t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), 1, t.device.index, stream)
    if t.device.type != "cpu":
        raise TypeError(f"{what}: device {t.device} is not supported (cpu or cuda)")
    return (t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), 0, 0, 0)


def optional_view(t, what: str = "tensor"):
    return None if t is None else view(t, what)
