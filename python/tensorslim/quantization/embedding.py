"""Embedding tables in the integer weight-only recipes: nn.Embedding / nn.EmbeddingBag become
QuantizedEmbedding / QuantizedEmbeddingBag with the config's embedding_bits (default 8, per row;
narrower tables use the config's group size, the last group short where it does not divide the
width, as for the linears). include / exclude select them like any layer; a table tied to an
output Linear (lm_head.weight is embed.weight) stays float and is reported, so the two stay one
tensor instead of being silently duplicated.

plan() builds every replacement without touching the model; swap() puts them in. The
weight-only transform plans before it quantizes the Linear layers and swaps after, so a
failure anywhere leaves the model as it was."""
import fnmatch
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..formats import integer_format
from ..nn.quantized_embedding import QuantizedEmbedding, QuantizedEmbeddingBag
from ..report import LayerChange, Report, module_bytes, remember_skipped
from ..transforms import _set_submodule

# (packed tables by name, report rows, {table tied to an output linear: that linear's name})
Plan = Tuple[Dict[str, nn.Module], List[LayerChange], Dict[str, str]]

# Tables default to INT8 per row whatever the linears' width: a lookup reads one row, so a
# narrower table saves memory but no time, and token tables are sensitive (MiniLM with INT4
# g128 linears: cosine 0.955 with INT8 tables, 0.931 with INT4 ones).
TABLE_BITS = 8


def _selected(name: str, mod: nn.Module, cfg) -> Optional[str]:
    if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
        return "not matched by include"
    for p in cfg.exclude:
        if fnmatch.fnmatchcase(name, p):
            return f"excluded by pattern {p!r}"
    if cfg.filter_fn is not None and not cfg.filter_fn(name, mod):
        return "rejected by filter_fn"
    return None


def plan(model: nn.Module, cfg) -> Plan:
    """({name: packed replacement}, report rows) for every embedding table of the model."""
    bits = cfg.embedding_bits or TABLE_BITS
    fmt = integer_format(bits, cfg.symmetric).name
    heads = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    new: Dict[str, nn.Module] = {}
    rows: List[LayerChange] = []
    tied: Dict[str, str] = {}
    # Tables sharing one weight (T5's shared / encoder / decoder embed_tokens) are packed one by
    # one: held as one module under every name, transformers' save_pretrained refuses the
    # shared tensors it does not declare tied.
    for name, mod in model.named_modules():
        if type(mod) not in (nn.Embedding, nn.EmbeddingBag):
            continue
        group = cfg.group_size if bits < 8 and cfg.group_size and cfg.group_size < mod.embedding_dim else None
        reason = _selected(name, mod, cfg)
        if reason is None and id(mod.weight) in heads:  # decided in swap, once the linears are done
            tied[name] = heads[id(mod.weight)]
        if reason is None and mod.max_norm is not None:
            reason = "max_norm renormalizes the table at lookup"
        if reason is None and mod.weight.device.type == "meta":
            reason = "weight is on the meta device (no data to quantize)"
        if reason:
            rows.append(LayerChange(name, type(mod).__name__, "skipped", bytes_before=module_bytes(mod), reason=reason))
            continue
        cls = QuantizedEmbedding if isinstance(mod, nn.Embedding) else QuantizedEmbeddingBag
        try:
            q = cls.from_embedding(mod, fmt, group)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer '{name}' ({type(mod).__name__}): {e}") from e
        new[name] = q
        rows.append(LayerChange(name, type(mod).__name__, "quantized", q.describe(), module_bytes(mod),
                                module_bytes(q), reason=f"tied to '{tied[name]}', packed too" if name in tied else ""))
    return new, rows, tied


def swap(model: nn.Module, planned: Plan, report: Report) -> Report:
    """Put the planned tables in and replace the report's generic 'not supported' rows for them.
    A table tied to an output linear that stayed float stays float with it (one tensor); one
    whose linear was packed is packed too (kept float, it would add a float copy to the packed
    linear's bytes: more memory than the one tied tensor before)."""
    new, rows, tied = planned
    for name, head in tied.items():
        table, linear = model.get_submodule(name), model.get_submodule(head)
        if isinstance(linear, nn.Linear) and linear.weight is table.weight:
            del new[name]
            rows = [r for r in rows if r.name != name] + [LayerChange(
                name, type(table).__name__, "skipped", bytes_before=module_bytes(table),
                reason=f"tied to the output layer '{head}', which stays float (one tensor for the two)")]
    for name, mod in new.items():
        _set_submodule(model, name, mod)
    names = {r.name for r in rows}
    report.changes = [c for c in report.changes if c.name not in names] + rows
    remember_skipped(model, report)
    return report
