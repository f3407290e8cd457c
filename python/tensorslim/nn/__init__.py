"""Compressed modules: each holds only its packed form and runs a real kernel."""
from .weight_only_linear import WeightOnlyLinear

# kind name in saved files -> module class (see io.py)
COMPRESSED_MODULES = {WeightOnlyLinear.kind: WeightOnlyLinear}

__all__ = ["WeightOnlyLinear", "COMPRESSED_MODULES"]
