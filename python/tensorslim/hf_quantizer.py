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

from .hf import QUANT_METHOD, checkpoint_renames

_REGISTRY = "transformers.quantizers.auto"


def _make_classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class TensorslimConfig(QuantizationConfigMixin):
        """config.quantization_config of a model tensorslim compressed: its layer specs."""

        def __init__(self, layers=None, format_version=1, **kwargs):
            self.quant_method = QUANT_METHOD
            self.layers = layers  # checked in validate_environment, with a message naming the problem
            self.format_version = format_version

    class TensorslimHfQuantizer(HfQuantizer):
        """Loads (never makes) tensorslim-compressed models."""

        requires_calibration = True  # the checkpoint must already be compressed

        def validate_environment(self, *args, **kwargs):
            from .hf import check_config

            check_config({"format_version": self.quantization_config.format_version,
                          "layers": self.quantization_config.layers}, "config.json")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from . import io

            shapes = _checkpoint_shapes(checkpoint_files)
            if shapes is not None:  # the model's names for the saved tensors
                rename = checkpoint_renames(model)
                shapes = {rename(k): v for k, v in shapes.items()}
            _, replacements = io.plan_layers(model, self.quantization_config.layers, "config.json", shapes)
            aliases = io.module_aliases(model)
            for name, new in replacements.items():
                io._set_submodule(model, name, new, aliases)
            if shapes is not None:  # transformers would fill a missing packed tensor with fresh memory
                io.check_stored(model, replacements, shapes, "the checkpoint")
            _untie_compressed(model)
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


def _untie_compressed(model) -> None:
    """Drop transformers' tied-weight entries naming a weight a compressed layer replaced: tying
    needs both to be Parameters (T5's config ties the head to the tables again whatever the
    saved config said, and loading raised '`weight` is not an nn.Parameter')."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return

    def is_param(key: str) -> bool:
        try:
            model.get_parameter(key)
            return True
        except AttributeError:
            return False

    model.all_tied_weights_keys = {t: s for t, s in tied.items() if is_param(t) and is_param(s)}


def _checkpoint_shapes(files):
    """{tensor name: (dtype, shape)} of the checkpoint's safetensors files (their headers only),
    or None when transformers gave no files (the shape and presence checks are then skipped)."""
    if not files:
        return None
    from safetensors import safe_open

    shapes = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            return None
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                s = handle.get_slice(k)
                shapes[k] = (s.get_dtype(), tuple(s.get_shape()))
    return shapes


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
