"""Mixture-of-experts blocks shown to a technique as one nn.Linear per expert (nn/expert_linears.py).

`experts_unfused(model)` swaps every fused experts module ExpertLinears can stand in for while a
transform runs (views of the same weights, nothing copied). Afterwards one stays only where one
of its linears was compressed; the others go back, with any edit a fold made to their weights,
and the Report gives them one row each. On an error every one goes back.
"""
import collections
from typing import Dict, List, Tuple

from torch import nn

from .nn.expert_linears import ExpertLinears
from .nn.int8_conv_chain import has_hooks
from .report import LayerChange, Report, compressed_layers, forget_skipped, module_bytes, remember_skipped
from .transforms import _set_submodule, swapped_while_running


class UnfusedExperts:
    def __init__(self, model: nn.Module, every_token: bool = False):
        self.model, self.every_token = model, every_token
        self.swapped: Dict[str, Tuple[nn.Module, ExpertLinears]] = {}

    def unfuse(self) -> None:
        held = collections.Counter(id(m) for _, m in self.model.named_modules(remove_duplicate=False))
        for name, mod in list(self.model.named_modules()):
            # hooks would be lost; one held under two names would be swapped under one only
            if name and held[id(mod)] == 1 and not has_hooks(mod) and ExpertLinears.why_not(mod) is None:
                self.swapped[name] = (mod, ExpertLinears.from_experts(mod))
        for name, (_, new) in self.swapped.items():
            new.every_token = self.every_token
            _set_submodule(self.model, name, new)

    def restore_all(self) -> None:
        for name, (old, _) in self.swapped.items():
            _set_submodule(self.model, name, old)

    def finish(self, report: Report) -> Report:
        """Put back the experts the transform left alone; their linears' rows become one."""
        for _, new in self.swapped.values():
            new.every_token = False  # the compressed model routes as the original did
        compressed = list(compressed_layers(self.model))
        back: List[str] = []
        for name, (_, new) in self.swapped.items():
            plain = all(type(lin) is nn.Linear for lins in (new.first, new.down) for lin in lins)
            if plain and not any(n.startswith(f"{name}.") for n in compressed):
                back.append(name)
        rows: List[LayerChange] = []
        for name in back:
            old, new = self.swapped[name]
            new.write_back(old)
            _set_submodule(self.model, name, old)
            mine = [c for c in report.changes if c.name.startswith(f"{name}.")]
            reasons = sorted({c.reason for c in mine if c.reason})
            rows.append(LayerChange(name, type(old).__name__, "skipped", bytes_before=module_bytes(old),
                                    reason="; ".join(reasons) or "its expert linears were left as they are"))
        prefixes = tuple(f"{n}." for n in back)
        report = Report([c for c in report.changes if not (prefixes and c.name.startswith(prefixes))] + rows)
        forget_skipped(self.model, back)  # their linears' rows: the experts' row says it
        remember_skipped(self.model, Report(rows))
        return report


def experts_unfused(model: nn.Module, every_token: bool = False):
    """Run a transform with every fused experts module unfused; call .finish(report) inside.
    every_token: each expert sees every token until finish (ExpertLinears.every_token)."""
    state = UnfusedExperts(model, every_token)
    state.unfuse()
    return swapped_while_running(state)
