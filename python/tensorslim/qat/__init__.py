"""Quantization-aware training: `ts.prepare_qat(model, config)`, train, `ts.convert(model)`."""
from .convert import convert
from .fake_quant import (ActivationSignQuant, BinaryFakeQuant, FloatFakeQuant, IntFakeQuant,
                         TernaryFakeQuant, WeightFakeQuant)
from .float_lsq import (FP8LSQFakeQuant, LearnedFloatFakeQuant, MXFP4LSQFakeQuant, NVFP4LSQFakeQuant,
                        learned_float_fake_quant)
from .lsq import grad_scale, lsq_gradient_scale
from .prepare import QATLinear, prepare_qat

__all__ = ["prepare_qat", "convert", "QATLinear", "WeightFakeQuant", "IntFakeQuant", "BinaryFakeQuant",
           "TernaryFakeQuant", "FloatFakeQuant", "ActivationSignQuant", "grad_scale", "lsq_gradient_scale",
           "LearnedFloatFakeQuant", "FP8LSQFakeQuant", "NVFP4LSQFakeQuant", "MXFP4LSQFakeQuant",
           "learned_float_fake_quant"]
