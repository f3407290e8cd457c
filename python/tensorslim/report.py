"""What a transform changed and what it skipped, and `ts.summary(model)`."""
import warnings
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

_REPORT_ATTR = "_tensorslim_skipped"
# Other families add rows to ts.summary(model) here (pruning: each pruned layer's sparsity).
SUMMARY_SOURCES: List[Callable[[nn.Module], List["LayerChange"]]] = []


@dataclass
class LayerChange:
    name: str
    module_type: str
    action: str  # "quantized", "factorized" or "skipped"
    format: Optional[str] = None
    bytes_before: int = 0
    bytes_after: int = 0
    reason: str = ""


def _has_parent_in(name: str, names: set) -> bool:
    """Whether a module enclosing `name` ("0" for "0.down") is among `names`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


# Runs of at least this many rows alike but for a trailing index (a MoE block's experts,
# `experts.gate_up.0` .. `experts.gate_up.127`) print as one row, `experts.gate_up.{0..127}`.
COLLAPSE_RUN = 8


def _indexed(name: str) -> Optional[Tuple[str, int]]:
    stem, _, last = name.rpartition(".")
    return (stem, int(last)) if last.isdigit() else None


def _collapsed(rows: List[LayerChange]) -> List[Tuple[str, LayerChange, int]]:
    """(printed name, row, how many rows it stands for): consecutive rows whose names differ
    only in a trailing index counting up by one, with the same type, action, format and note."""
    out: List[Tuple[str, LayerChange, int]] = []
    i = 0
    while i < len(rows):
        j, first = i + 1, _indexed(rows[i].name)
        while first is not None and j < len(rows):
            r, nxt = rows[j], _indexed(rows[j].name)
            same = (r.module_type, r.action, r.format, r.reason) == (rows[i].module_type, rows[i].action,
                                                                     rows[i].format, rows[i].reason)
            if not same or nxt != (first[0], first[1] + j - i):
                break
            j += 1
        if first is not None and j - i >= COLLAPSE_RUN:
            run = rows[i:j]
            total = dataclasses.replace(rows[i], bytes_before=sum(r.bytes_before for r in run),
                                        bytes_after=sum(r.bytes_after for r in run))
            out.append((f"{first[0]}.{{{first[1]}..{first[1] + j - i - 1}}}", total, j - i))
            i = j
        else:
            out.append((rows[i].name, rows[i], 1))
            i += 1
    return out


def _table(rows: List[LayerChange]) -> List[str]:
    lines = [f"{'layer':<48} {'type':<18} {'format':<22} {'before':>11} {'after':>11}  note"]
    for name, r, n in _collapsed(rows):
        fmt = r.format or "-"
        after = _fmt_bytes(r.bytes_after) if r.action != "skipped" else "-"
        note = f"{n} layers" + (f"; {r.reason}" if r.reason else "") if n > 1 else r.reason
        lines.append(f"{name:<48} {r.module_type:<18} {fmt:<22} {_fmt_bytes(r.bytes_before):>11} "
                     f"{after:>11}  {note}")
    return lines


@dataclass
class Report:
    """Returned by every transform: one row per layer it considered."""

    changes: List[LayerChange] = field(default_factory=list)

    @property
    def changed(self) -> List[LayerChange]:
        return [c for c in self.changes if c.action != "skipped"]

    @property
    def skipped(self) -> List[LayerChange]:
        return [c for c in self.changes if c.action == "skipped"]

    def totals(self) -> Tuple[int, int]:
        """(bytes before, bytes after) of the changed layers. A row inside another changed row
        (a factorized layer's quantized factors) is in that row's bytes already: left out."""
        names = {c.name for c in self.changed}
        outer = [c for c in self.changed if not _has_parent_in(c.name, names)]
        return sum(c.bytes_before for c in outer), sum(c.bytes_after for c in outer)

    def __str__(self) -> str:
        before, after = self.totals()
        head = (f"{len(self.changed)} layers changed ({_fmt_bytes(before)} -> {_fmt_bytes(after)}), "
                f"{len(self.skipped)} skipped")
        return "\n".join([head] + _table(self.changes))


def warn_if_nothing_changed(report: Report, verb: str) -> Report:
    """A UserWarning when a transform compressed nothing (a model whose layers are all of an
    unsupported kind would otherwise pass silently); the reasons come from the skipped rows."""
    if not report.changed:
        reasons = sorted({c.reason for c in report.skipped if c.reason})
        why = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "") if reasons else "no layer it handles"
        warnings.warn(f"{verb}: nothing was compressed ({len(report.skipped)} layers skipped: {why}); "
                      f"see the returned Report", UserWarning, stacklevel=3)
    return report


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (its state_dict)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def remember_skipped(model: nn.Module, report: Report) -> None:
    kept = {c.name: c for c in getattr(model, _REPORT_ATTR, [])}
    for c in report.skipped:
        kept[c.name] = c
    for c in report.changed:
        kept.pop(c.name, None)
    object.__setattr__(model, _REPORT_ATTR, list(kept.values()))


def forget_skipped(model: nn.Module, names, inside: bool = True) -> None:
    """Drop the remembered skipped rows of these module names (and, inside=True, of modules inside
    them): a layer a later step restructured, whose old rows would describe what it no longer is."""
    names = tuple(names)
    prefixes = tuple(f"{n}." for n in names) if inside else ()
    kept = [c for c in getattr(model, _REPORT_ATTR, [])
            if c.name not in names and not (prefixes and c.name.startswith(prefixes))]
    object.__setattr__(model, _REPORT_ATTR, kept)


def skipped_rows(model: nn.Module) -> List[LayerChange]:
    """The skipped rows transforms left on the model (ts.summary lists those still uncompressed)."""
    return list(getattr(model, _REPORT_ATTR, []))


def compressed_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The layers a transform will not touch again: compressed ones and QAT-prepared ones."""
    from .nn import COMPRESSED_MODULES, CompressedLinear, FoldedBatchNorm
    from .qat.prepare import QATLinear

    kinds = tuple(k for k in COMPRESSED_MODULES.values() if k is not FoldedBatchNorm) + (CompressedLinear, QATLinear)
    return {n: m for n, m in model.named_modules() if n and isinstance(m, kinds)}


def note_already_compressed(report: Report, layers: Dict[str, nn.Module]) -> Report:
    """Rows saying why layers compressed before the transform stayed as they were, so
    quantizing a model twice does not silently report nothing."""
    from .qat.prepare import QATLinear

    named = {c.name for c in report.changes}
    for name, mod in layers.items():
        if name not in named and not any(_has_parent_in(n, {name}) for n in named):  # nor its factors
            what = "prepared for QAT (call ts.convert)" if isinstance(mod, QATLinear) else "compressed"
            report.changes.append(LayerChange(name, type(mod).__name__, "skipped", mod.describe(), module_bytes(mod),
                                              reason=f"already {what}; start from the float model to change it"))
    return report


def _float_element_bytes(mod: nn.Module) -> int:
    """Bytes per element of the float layer a compressed one replaced (its weight's dtype, which
    the swap records: a bf16 model's layers were half the fp32 size), else of the dtype it
    computes in, else 4."""
    from .nn.compute_dtype import KeepsPackedDtypes

    dtype = getattr(mod, "replaced_dtype", None)
    if dtype is None and isinstance(mod, KeepsPackedDtypes):
        dtype = mod.compute_dtype
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def summary(model: nn.Module) -> Report:
    """Every compressed layer (format, bytes before -> after) and every skipped one, with why."""
    from .nn import COMPRESSED_MODULES

    kinds = tuple(COMPRESSED_MODULES.values())
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):
            if hasattr(mod, "dense_bytes"):  # factorized layers (convs too) know what they replaced
                fp32 = mod.dense_bytes()
            else:
                fp32 = 4 * mod.in_features * mod.out_features + (4 * mod.out_features if mod.bias is not None else 0)
            before = fp32 * _float_element_bytes(mod) // 4  # a half model's layers were half
            rows.append(LayerChange(name, type(mod).__name__, getattr(mod, "action", "quantized"),
                                    mod.describe(), before, module_bytes(mod),
                                    mod.note() if hasattr(mod, "note") else ""))
    for source in SUMMARY_SOURCES:
        rows.extend(source(model))
    names = dict(model.named_modules())
    for c in skipped_rows(model):
        if c.name in names and not isinstance(names[c.name], kinds):
            rows.append(c)
    return Report(rows)
