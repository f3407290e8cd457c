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

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of the stored codes: int8 for symmetric 8-bit, uint8 (bytes) otherwise."""
        return torch.int8 if self.bits == 8 and not self.has_zero_point else torch.uint8

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
    )
    for row in _C.format_table()
}


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
