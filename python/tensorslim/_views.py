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


class _View(tuple):
    """A view tuple that also holds its tensor: `view(x.contiguous())` keeps the temporary
    alive for as long as the view exists (the whole native call), not just until view()
    returns. The core reads only the tuple; the reference is what keeps the memory valid."""

    def __new__(cls, fields: tuple, tensor: torch.Tensor):
        self = super().__new__(cls, fields)
        self.tensor = tensor
        return self


# float64 crosses only where a caller asks for it (the distillation losses' reference path);
# every other kernel keeps rejecting it here.
_FLOAT64_CODE = 8


def view(t: torch.Tensor, what: str = "tensor", float64: bool = False) -> tuple:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    code = _FLOAT64_CODE if float64 and t.dtype == torch.float64 else _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported by the native core")
    if t.is_cuda:
        stream = torch.cuda.current_stream(t.device).cuda_stream
        return _View((t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), 1, t.device.index, stream), t)
    if t.device.type != "cpu":
        raise TypeError(f"{what}: device {t.device} is not supported (cpu or cuda; meta tensors "
                        "have no data)")
    return _View((t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), 0, 0, 0), t)


def optional_view(t, what: str = "tensor"):
    return None if t is None else view(t, what)
