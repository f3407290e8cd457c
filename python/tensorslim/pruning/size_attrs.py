"""The size attributes structured pruning shrinks, read and set by name.

Most are the module's own ints (`out_features`, `num_heads`). A few models read a per-layer
size from the config every layer shares (Phi-3's attention slices its fused projection at
`self.config.num_attention_heads`): that size is named `config.<attribute>`, and setting it
gives the module a ConfigView, the shared config with that one attribute of its own.
"""
from typing import Any

from torch import nn

CONFIG_PREFIX = "config."


class ConfigView:
    """`base` (a model config) with some attributes of its own; every other attribute is read
    from and written to `base`, so later changes to the model's config (its attention
    implementation, say) still reach this layer."""

    def __init__(self, base: Any):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_own", {})

    def __getattr__(self, name: str):  # called only for names not found on the view itself
        own, base = self.__dict__.get("_own"), self.__dict__.get("_base")
        if own is None or base is None:  # (copy / pickle probing a view not built yet)
            raise AttributeError(name)
        return own[name] if name in own else getattr(base, name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"ConfigView({self._own}, base={type(self._base).__name__})"


def check_name(attr: str) -> bool:
    """Whether `attr` names a size attribute: an identifier, or config.<identifier>."""
    name = attr[len(CONFIG_PREFIX):] if attr.startswith(CONFIG_PREFIX) else attr
    return name.isidentifier() and not name.startswith("_")


def get_size(mod: nn.Module, attr: str, default=None):
    if attr.startswith(CONFIG_PREFIX):
        return getattr(getattr(mod, "config", None), attr[len(CONFIG_PREFIX):], default)
    return getattr(mod, attr, default)


def set_size(mod: nn.Module, attr: str, value: int) -> None:
    """Sets one size attribute; config.<name> goes to the module's own ConfigView (made on
    first use), which is dropped again when every attribute it holds equals its base's (so
    undoing a prune leaves the module's config exactly as it was)."""
    if not attr.startswith(CONFIG_PREFIX):
        setattr(mod, attr, value)
        return
    name = attr[len(CONFIG_PREFIX):]
    view = mod.config
    if not isinstance(view, ConfigView):
        view = ConfigView(view)
        mod.config = view
    view._own[name] = value
    if all(getattr(view._base, k, None) == v for k, v in view._own.items()):
        mod.config = view._base
