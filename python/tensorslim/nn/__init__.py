"""Compressed modules: each holds only its packed form and runs a real kernel."""
from .weight_only_linear import WeightOnlyLinear
from .binary_linear import BinaryLinear, TernaryLinear
from .lowbit_linear import LowBitLinear

# kind name in saved files -> module class (see io.py)
COMPRESSED_MODULES = {WeightOnlyLinear.kind: WeightOnlyLinear}
COMPRESSED_MODULES[BinaryLinear.kind] = BinaryLinear
COMPRESSED_MODULES[TernaryLinear.kind] = TernaryLinear
COMPRESSED_MODULES[LowBitLinear.kind] = LowBitLinear
from .int8_linear import Int8Linear  # noqa: E402
COMPRESSED_MODULES[Int8Linear.kind] = Int8Linear

__all__ = ["WeightOnlyLinear", "COMPRESSED_MODULES", "BinaryLinear", "TernaryLinear", "LowBitLinear", "Int8Linear"]
