"""The format table, read from the C++ core so both sides share one definition."""
from dataclasses import dataclass

import torch

from ._native import _C

PER_TENSOR = -1  # group_size meaning one scale for the whole tensor


@dataclass(frozen=True)
class FormatSpec:
    id: int
    name: str
    bits: int
    has_zero_point: bool
    qmin: int
    qmax: int
    scale_divisor: int
    block_size: int = 0  # 0: any group size; NVFP4 16, MXFP4 32
    scale_format: str = "float32"  # "float32", "e4m3" (NVFP4) or "e8m0" (MXFP4): one byte per block
    is_float: bool = False  # elements are small floats (E4M3, E5M2, E2M1)
    exp_bits: int = 0
    man_bits: int = 0
    max_value: float = 0.0  # largest finite element magnitude
    has_tensor_scale: bool = False  # NVFP4: one extra fp32 scale per tensor
    code_values: tuple = ()  # value of each bit pattern at scale 1 (floats, binary, ternary)

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of the stored codes: int8 for symmetric 8-bit integers, uint8 (bytes) otherwise."""
        if self.bits == 8 and not self.has_zero_point and not self.is_float:
            return torch.int8
        return torch.uint8

    @property
    def scale_dtype(self) -> torch.dtype:
        """fp32 scales, or one byte per block for the E4M3 / E8M0 block scales."""
        return torch.float32 if self.scale_format == "float32" else torch.uint8

    @property
    def is_integer(self) -> bool:
        """int<N> / uint<N> rows (the formats with qmin..qmax integer codes)."""
        return self.name.startswith(("int", "uint"))

    def packed_cols(self, cols: int) -> int:
        return (cols * self.bits + 7) // 8


FORMATS = {
    row["name"]: FormatSpec(
        id=row["id"],
        name=row["name"],
        bits=row["bits"],
        has_zero_point=row["has_zero_point"],
        qmin=row["qmin"],
        qmax=row["qmax"],
        scale_divisor=row["scale_divisor"],
        block_size=row["block_size"],
        scale_format=row["scale_format"],
        is_float=row["is_float"],
        exp_bits=row["exp_bits"],
        man_bits=row["man_bits"],
        max_value=row["max_value"],
        has_tensor_scale=row["has_tensor_scale"],
        code_values=tuple(row["code_values"]),
    )
    for row in _C.format_rows()
}

# Rows the original integer kernels (ops.quantize / ops.linear_weight_only) take; every
# other row goes through ops.lowbit.
INTEGER_KERNEL_FORMATS = ("int8", "uint8", "int4", "uint4")


def get_format(name: str) -> FormatSpec:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {sorted(FORMATS)}") from None


def integer_format(bits: int, symmetric: bool) -> FormatSpec:
    """The table row for N-bit integers: symmetric "int<N>" (signed) or "uint<N>" (zero point)."""
    name = f"{'int' if symmetric else 'uint'}{bits}"
    if name not in FORMATS:
        have = sorted({s.bits for s in FORMATS.values() if s.name.startswith(("int", "uint"))})
        raise ValueError(f"no integer format with {bits} bits (supported: {have})")
    return FORMATS[name]


def num_groups(cols: int, group_size: int) -> int:
    """Scale groups per row of `cols` values for a positive group size: ceil(cols / group_size).
    When group_size does not divide cols the last group is short (cols - (groups - 1) *
    group_size values, all of them when group_size > cols), as compressed-tensors stores it."""
    return -(-cols // group_size)


def has_short_group(cols: int, group_size: int) -> bool:
    """True when a row of `cols` values splits into several groups and the last one is short."""
    return 0 < group_size < cols and cols % group_size != 0
