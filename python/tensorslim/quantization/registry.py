"""Which transform applies which quantization config (filled by each technique's module)."""
from typing import Callable, Dict

TRANSFORMS: Dict[type, Callable] = {}


def register_transform(*config_types: type):
    """Decorator: `fn(model, cfg, *, forward_loop, progress) -> Report` applies these configs."""

    def wrap(fn):
        for t in config_types:
            TRANSFORMS[t] = fn
        return fn

    return wrap
