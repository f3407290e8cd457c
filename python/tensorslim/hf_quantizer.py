"""transformers' own `from_pretrained` loads a compressed model: a quantizer registered with
transformers under quant_method "tensorslim" (the config.quantization_config every tensorslim
verb writes, see hf.py) replaces the listed layers by empty compressed modules before the
weights are loaded, so `AutoModelForCausalLM.from_pretrained(dir)` gives the saved model back.

Importing transformers' quantizer registry costs seconds, so tensorslim does not import it:
`install()` registers at once if transformers has loaded it already, else when it is imported
(a one-shot import hook), whichever order the user's imports come in.
"""
import importlib.abc
import importlib.util
import sys
import warnings

from .hf import QUANT_METHOD

_REGISTRY = "transformers.quantizers.auto"


def _make_classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class TensorslimConfig(QuantizationConfigMixin):
        """config.quantization_config of a model tensorslim compressed: its layer specs."""

        def __init__(self, layers=None, format_version=1, **kwargs):
            self.quant_method = QUANT_METHOD
            self.layers = dict(layers or {})
            self.format_version = format_version

    class TensorslimHfQuantizer(HfQuantizer):
        """Loads (never makes) tensorslim-compressed models."""

        requires_calibration = True  # the checkpoint must already be compressed

        def validate_environment(self, *args, **kwargs):
            from .hf import CONFIG_FORMAT_VERSION

            if self.quantization_config.format_version > CONFIG_FORMAT_VERSION:
                raise ValueError(f"tensorslim quantization_config version {self.quantization_config.format_version} "
                                 f"is newer than this tensorslim reads ({CONFIG_FORMAT_VERSION}); upgrade tensorslim")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from . import io

            _, replacements = io.plan_layers(model, self.quantization_config.layers, "config.json")
            for name, new in replacements.items():
                io._set_submodule(model, name, new)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            # transformers refuses .half() / .float() on quantized models; compressed layers
            # follow them (they change the compute dtype), so that guard does not apply.
            model.is_quantized = False
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self):
            return True  # gradients reach the inputs of compressed layers: adapters train

    return TensorslimConfig, TensorslimHfQuantizer


def register(auto=None) -> None:
    """Register the tensorslim quantizer with transformers (once; `auto`: the registry module)."""
    auto = auto if auto is not None else importlib.import_module(_REGISTRY)
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    config_cls, quantizer_cls = _make_classes()
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
    auto.register_quantizer(QUANT_METHOD)(quantizer_cls)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers right after transformers' quantizer registry module has run, then leaves."""

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register(module)
            except Exception as e:  # never break importing transformers
                warnings.warn(f"tensorslim: could not register with transformers ({e!r}); load compressed "
                              f"models with ts.from_pretrained", RuntimeWarning)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _REGISTRY in sys.modules:
        register(sys.modules[_REGISTRY])
    elif importlib.util.find_spec("transformers") is not None and \
            not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
