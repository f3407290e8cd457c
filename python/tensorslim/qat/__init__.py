"""Quantization-aware training: `ts.prepare_qat(model, config)`, train, `ts.convert(model)`."""
from .convert import convert
from .fake_quant import (ActivationSignQuant, BinaryFakeQuant, FloatFakeQuant, IntFakeQuant,
                         TernaryFakeQuant, WeightFakeQuant)
from .lsq import grad_scale, lsq_gradient_scale
from .prepare import QATLinear, prepare_qat

__all__ = ["prepare_qat", "convert", "QATLinear", "WeightFakeQuant", "IntFakeQuant", "BinaryFakeQuant",
           "TernaryFakeQuant", "FloatFakeQuant", "ActivationSignQuant", "grad_scale", "lsq_gradient_scale"]
