"""torch's nn.MultiheadAttention shown to a technique as four linears (nn/projected_attention.py).

`attention_unpacked(model)` swaps every nn.MultiheadAttention for a ProjectedMultiheadAttention
(views of the same weights, nothing copied) while a transform runs. Afterwards one stays only
where it is needed: a projection was compressed, or a layer of the nn.TransformerEncoderLayer
around it was (whose fused fast path would otherwise read that layer's dequantized `.weight`
and never run its kernel). The others go back, with any edit a fold made to their projections,
and the Report names them once. On an error every one goes back.
"""
import collections
from typing import Dict, List, Tuple

from torch import nn

from .nn.int8_conv_chain import has_hooks
from .nn.projected_attention import ProjectedMultiheadAttention
from .report import LayerChange, Report, compressed_layers, forget_skipped, module_bytes, remember_skipped
from .transforms import _set_submodule, swapped_while_running

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class UnpackedAttention:
    def __init__(self, model: nn.Module):
        self.model = model
        self.swapped: Dict[str, Tuple[nn.MultiheadAttention, ProjectedMultiheadAttention]] = {}
        self.encoders: List[Tuple[nn.Module, bool]] = []  # (nn.TransformerEncoder, its use_nested_tensor)

    def unpack(self) -> None:
        held = collections.Counter(id(m) for _, m in self.model.named_modules(remove_duplicate=False))
        for name, mod in list(self.model.named_modules()):
            # exactly torch's class: a subclass may compute something else; hooks would be lost;
            # one held under two names would be swapped under one only
            if name and type(mod) is nn.MultiheadAttention and not has_hooks(mod) and held[id(mod)] == 1:
                self.swapped[name] = (mod, ProjectedMultiheadAttention.from_float(mod))
        for name, (_, new) in self.swapped.items():
            _set_submodule(self.model, name, new)
        self.encoders = settle_encoders(self.model)

    def restore_all(self) -> None:
        for name, (old, _) in self.swapped.items():
            _set_submodule(self.model, name, old)
        for enc, nested in self.encoders:
            enc.use_nested_tensor = nested

    def finish(self, report: Report) -> Report:
        """Put back the attentions the transform left alone; their projections' rows become one."""
        compressed = list(compressed_layers(self.model))
        back = {}
        for name, (old, new) in self.swapped.items():
            scope = _scope(self.model, name)
            plain = all(type(getattr(new, p)) is nn.Linear for p in PROJECTIONS[:3]) and (
                new.out_proj is old.out_proj or type(new.out_proj) is nn.Linear)  # or its stand-in
            if plain and not any(n.startswith(scope) for n in compressed):
                back[name] = (old, new)
        report = self.put_back(back, report, "its projections were left as they are")
        forget_skipped(self.model, back)  # their projections' rows: the attention's row says it
        forget_skipped(self.model, [n for n in self.swapped if n not in back], inside=False)  # "packed" rows
        remember_skipped(self.model, Report([c for c in report.changes if c.name in back]))
        return report

    def put_back(self, names, report: Report, default_reason: str) -> Report:
        """Pack the attentions `names` again (their projections still nn.Linear layers of the
        original shapes); the report's rows of their projections become one row each."""
        rows: List[LayerChange] = []
        for name in names:
            old, new = self.swapped[name]
            new.write_back(old)
            _set_submodule(self.model, name, old)
            mine = [c for c in report.changes if c.name == name or c.name.startswith(f"{name}.")]
            reasons = sorted({c.reason for c in mine if c.reason})
            rows.append(LayerChange(name, "MultiheadAttention", "skipped", bytes_before=module_bytes(old),
                                    reason="; ".join(reasons) or default_reason))
        for enc, nested in self.encoders:
            if not any(isinstance(m, ProjectedMultiheadAttention) for m in enc.modules()):
                enc.use_nested_tensor = nested
        gone = tuple(f"{n}." for n in names)
        kept = [c for c in report.changes if c.name not in names and not (gone and c.name.startswith(gone))]
        return Report(kept + rows)


def unpack_attention(model: nn.Module) -> List[str]:
    """Replace every nn.MultiheadAttention in `model` (torch's class itself, without hooks) by a
    ProjectedMultiheadAttention computing the same, its q / k / v / out projections nn.Linear
    layers; returns their names. ts.quantize, ts.sparsify and ts.factorize do this by themselves
    where it is needed. Before ts.prepare_qat or ts.prune (and before creating the optimizer:
    the q / k / v weights become new parameters) it lets training compress the projections.
    The state_dict keys change with it (q_proj.weight, not in_proj_weight)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpack_attention: expected a torch.nn.Module, got {type(model).__name__}")
    state = UnpackedAttention(model)
    state.unpack()
    forget_skipped(model, state.swapped, inside=False)  # rows a verb left saying the attention is packed
    return list(state.swapped)


def settle_encoders(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """nn.TransformerEncoders holding an unpacked attention stop converting padded batches to
    nested tensors (their fast path needs torch's packed attention); returns (encoder, the
    setting it had). ts.load calls it too."""
    changed = []
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and any(isinstance(m, ProjectedMultiheadAttention)
                                                           for m in enc.modules()):
            changed.append((enc, getattr(enc, "use_nested_tensor", False)))
            enc.use_nested_tensor = False
    return changed


def _scope(model: nn.Module, name: str) -> str:
    """The name prefix whose compressed layers keep the attention `name` unpacked: that of the
    nn.TransformerEncoderLayer it is the self_attn of ("" when that is the model), else its own."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if child == "self_attn" and isinstance(owner, nn.TransformerEncoderLayer):
        return f"{parent}." if parent else ""
    return f"{name}."


def attention_unpacked(model: nn.Module):
    """Run a transform with every nn.MultiheadAttention unpacked; call .finish(report) inside."""
    state = UnpackedAttention(model)
    state.unpack()
    return swapped_while_running(state)
