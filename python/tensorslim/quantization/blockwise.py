"""Block-by-block calibration: the pipeline AWQ and GPTQ run on.

The model is split into blocks (its transformer layers: the longest nn.ModuleList holding
Linear layers; otherwise the children of an nn.Sequential; otherwise the whole model as
one block). The calibration data runs through the model once, up to the first block,
whose inputs (positional and keyword: attention masks, position embeddings, ...) are
captured. Then each block in turn is calibrated on its inputs, quantized, and run to
produce the next block's inputs, so at any time the working set is one block plus its
activations, and the model is never copied.

Target layers a block never runs on any calibration batch (a branch the data does not
take, an expert no token is routed to) have nothing to calibrate on: the config's `unreached`
says what becomes of them (tensorslim.config.check_calibration_fields): the data-free version the layers
outside every block get ("fallback"), float ("skip"), both with a RuntimeWarning and their
Report rows, or a ValueError naming them all, found by one float pass before anything changes
("error"). If no target runs at all, that is an error.

A failure anywhere puts back every module and parameter the pipeline replaced, so the
model is left as it was.
"""
import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import FORMATS
from ..nn import WeightOnlyLinear
from ..report import LayerChange, Report, module_bytes, remember_skipped
from ..transforms import _is_weight_matrix_layer, _tied_to_embedding, adopt_float_dtype, filter_reason, held_weights_row
from . import token_mask
from .calibrate import (NEVER_RAN, UNREACHED_NOTE, ForwardLoop, check_reached, eval_mode, require_forward_loop,
                        warn_unreached)

class BlockInput(tuple):
    """(args, kwargs) of one captured block call, carrying its batch's padding mask
    (token_mask: re-runs of the block leave those positions out of statistics too)."""

    def __new__(cls, args, kwargs: Optional[dict] = None, mask: Optional[torch.Tensor] = None):
        if kwargs is None:  # type(x)(iterable), as generic helpers rebuild a sequence (mask not kept)
            args, kwargs = tuple(args)
        obj = super().__new__(cls, (args, kwargs))
        obj.mask = mask
        return obj

    def __getnewargs__(self):  # copy / pickle rebuild it with its mask
        return (self[0], self[1], self.mask)


Inputs = List[BlockInput]  # one per calibration batch


class _StopForward(Exception):
    """Raised by the capture hook to skip the rest of the model."""


# ---------------------------------------------------------------- finding blocks


def _has_linear(mod: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in mod.modules())


def find_block_stacks(model: nn.Module) -> List[List[Tuple[str, nn.Module]]]:
    """The block sequences calibrated one after another, in the model's order: each ModuleList
    of blocks holding Linear layers that is not inside another such list (a decoder's layers;
    an encoder-decoder's encoder blocks, then its decoder blocks); else the children of an
    nn.Sequential, else the whole model as one block."""
    stacks: List[Tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and _has_linear(mod) and \
                not any(name.startswith(outer + ".") for outer, _ in stacks):
            stacks.append((name, mod))
    if stacks:
        return [[(f"{name}.{i}", m) for i, m in enumerate(mod)] for name, mod in stacks]
    if isinstance(model, nn.Sequential) and len(model) > 0:
        return [[(name, m) for name, m in model.named_children()]]
    return [[("", model)]]


def find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every block, the stacks one after another."""
    return [b for stack in find_block_stacks(model) for b in stack]


# ---------------------------------------------------------------- capturing inputs


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def no_cache(model: nn.Module):
    """A KV cache would grow every time a block is re-run (and a cross-attention cache would
    skip its key / value layers): off in every config (an encoder-decoder's stacks have their own)."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if getattr(c, "use_cache", None)}
    try:
        for c in configs.values():
            c.use_cache = False
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def capture_block_inputs(model: nn.Module, block: nn.Module, forward_loop: ForwardLoop,
                         allow_none: bool = False) -> Inputs:
    """Run the calibration data up to `block` and return its inputs, one entry per batch
    (allow_none: an empty list where the data never reaches it, else an error)."""
    captured: Inputs = []
    original_forward = model.forward
    own = model.__dict__.get("forward")  # an instance forward (a fused epilogue, a wrapper) stays

    if block is model:
        def forward(*args, **kwargs):  # the whole model is the block: record its own inputs
            captured.append(BlockInput(_detach(args), _detach(kwargs), token_mask.current()))
            return None
        hook = None
    else:
        def pre_hook(mod, args, kwargs):
            captured.append(BlockInput(_detach(args), _detach(kwargs), token_mask.current()))
            raise _StopForward

        def forward(*args, **kwargs):
            try:
                return original_forward(*args, **kwargs)
            except _StopForward:
                return None
        hook = block.register_forward_pre_hook(pre_hook, with_kwargs=True)

    model.forward = forward  # instance attribute: nn.Module.__call__ finds it first
    try:
        with torch.no_grad(), no_cache(model):
            forward_loop(model)
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own
        if hook is not None:
            hook.remove()
    if not captured and not allow_none:
        raise ValueError(f"calibration: the forward loop never reached the first block ({type(block).__name__}): "
                         f"is the calibration data empty, or is that block a container the model never "
                         f"calls itself (a ModuleList of ModuleLists)?")
    return captured


@contextlib.contextmanager
def errors_named(where: str):
    """A ValueError / TypeError raised inside says where (a block, a layer in it); '' adds
    nothing (a block that is itself the layer)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if not where:
            raise
        raise type(e)(f"{where}: {e}") from e


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (HF layers may return a tuple)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"calibration: a block returned {type(out).__name__}; expected a tensor "
                        f"(or a tuple starting with one)")
    return out


def run_block(block: nn.Module, inp: Tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = inp
    with torch.no_grad(), token_mask.padding(getattr(inp, "mask", None)):
        try:
            out = block(*args, **kwargs)
        except RuntimeError as e:  # e.g. batches in another dtype than the model: as make_forward_loop says it
            raise ValueError(f"calib_data does not run through the model's block {type(block).__name__}: {e}") from e
    return block_output(out)


class _BatchDone(BaseException):
    """Raised by a statistics hook once a batch has given every input it needs. A
    BaseException, so that a block's own `except Exception` cannot swallow it."""


class StopAtLastCall:
    """Ends a statistics pass's block forward at the last target call it needs: a pass that
    only gathers the targets' inputs has no use for the rest (the last layer's own product,
    the residual add after it), which is ~20% of a transformer block's forward.

    The hooks are forward *pre*-hooks and call `ran(name)` after recording an input. The first
    batch runs whole and fixes how often each target runs per batch; on later batches the
    call that brings every count to it raises, so the block stops there. Without that plan
    (a needed target did not run in the first batch: data-dependent routing may still call
    it late in a later one) every batch runs whole. A block that runs one layer a
    data-dependent number of times per batch would lose that layer's extra calls."""

    def __init__(self):
        self.plan: Optional[Dict[str, int]] = None
        self.seen: Dict[str, int] = {}

    def ran(self, name: str) -> None:
        self.seen[name] = self.seen.get(name, 0) + 1
        if self.plan is not None and self.seen == self.plan:
            raise _BatchDone

    def run(self, block: nn.Module, inp: Tuple[tuple, dict]) -> None:
        self.seen = {}
        try:
            run_block(block, inp)
        except _BatchDone:
            pass

    def first_batch_done(self, needed) -> None:
        """After the first batch: `needed`, the targets whose inputs the pass takes."""
        needed = list(needed)
        self.plan = dict(self.seen) if needed and all(n in self.seen for n in needed) else None


def next_inputs(inp: Tuple[tuple, dict], out: torch.Tensor) -> Tuple[tuple, dict]:
    """The next block gets this block's output in place of its hidden states."""
    args, kwargs = inp
    mask = getattr(inp, "mask", None)
    if args:
        return BlockInput((out,) + tuple(args[1:]), kwargs, mask)
    if "hidden_states" in kwargs:
        return BlockInput(args, {**kwargs, "hidden_states": out}, mask)
    raise ValueError("calibration: cannot tell which block input is the hidden state "
                     "(no positional argument and no 'hidden_states' keyword)")


# ---------------------------------------------------------------- undoable edits


class Edits:
    """setattr with memory: every replacement can be undone, newest first."""

    def __init__(self):
        self._log: List[Tuple[nn.Module, str, Any]] = []

    def set(self, owner: nn.Module, name: str, value: Any) -> None:
        self._log.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self, owners) -> None:
        """Put back the original attributes of `owners` (modules leaving the model) now, so
        their edited copies are freed; their entries leave the log."""
        ids = {id(o) for o in owners}
        kept = []
        for owner, name, old in reversed(self._log):
            if id(owner) in ids:
                setattr(owner, name, old)  # newest first: the oldest value is set last
            else:
                kept.append((owner, name, old))
        self._log = kept[::-1]

    def mark(self) -> int:
        return len(self._log)

    def undo(self, to: int = 0) -> None:
        while len(self._log) > to:
            owner, name, old = self._log.pop()
            setattr(owner, name, old)


def set_submodule(root: nn.Module, name: str, new: nn.Module, edits: Edits) -> None:
    if not name:
        raise ValueError("calibration: cannot replace the model itself; wrap the layer in a module")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    adopt_float_dtype(getattr(parent, child), new)
    edits.set(parent, child, new)


# ---------------------------------------------------------------- the pipeline


@dataclass
class WeightSpec:
    """What the weights become: bits, symmetry, group size (None: per channel), format name."""

    bits: int
    symmetric: bool
    group_size: Optional[int]
    backend: str = "auto"
    simulate: bool = False  # keep float nn.Linear layers with quantized-dequantized weights

    @property
    def fmt(self) -> str:
        return f"{'int' if self.symmetric else 'uint'}{self.bits}"

    def group_for(self, in_features: int) -> int:
        return self.group_size or in_features

    def describe(self, in_features: int) -> str:
        group = "per-channel" if not self.group_size or self.group_size == in_features else f"g{self.group_size}"
        return f"{self.fmt} {group}"


def make_layer(linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
               zero_points: torch.Tensor, spec: WeightSpec,
               input_scale: Optional[torch.Tensor] = None) -> nn.Module:
    """The packed WeightOnlyLinear for chosen codes, or (simulate) a float Linear holding
    exactly the weights those codes dequantize to. input_scale [in]: the codes encode the
    weight in a scaled domain and the layer multiplies its input by input_scale (simulated:
    folded into the float weight's columns, the same function)."""
    group = spec.group_for(linear.in_features)
    device = linear.weight.device
    if spec.simulate or spec.fmt not in FORMATS:
        if not spec.simulate:
            raise ValueError(f"format {spec.fmt} is not in the format table; "
                             f"known: {sorted(FORMATS)}")
        from ..ops import calibration as C  # the last group may be short

        w = C.dequantize_codes(codes, scales, zero_points, group)
        if input_scale is not None:
            w = w * input_scale.to(w.device, w.dtype)[None, :]
        new = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None,
                        device=device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new
    zps = zero_points.to(device) if not spec.symmetric else None
    scale = input_scale.to(device) if input_scale is not None else None
    return WeightOnlyLinear.from_codes(codes.to(device), scales.to(device), zps, spec.fmt, group,
                                       linear.bias, spec.backend, scale)


@dataclass
class FloatReference:
    """The float model at the block being calibrated: a float copy of the block and its inputs
    as the float model computes them (the quantized pipeline's inputs drift from these)."""

    block: nn.Module
    inputs: Inputs


# quantize_block(block, targets {local name: Linear}, inputs, edits[, reference][, outputs=list])
#   -> {local name: (new, note)}; reference is given only when the pipeline keeps one, outputs
#   only with float_outputs (see calibrate_blockwise).
BlockFn = Callable[..., Dict[str, Tuple[nn.Module, str]]]


def plan_layers(model: nn.Module, cfg, blocks, check, layer_types: Tuple[type, ...] = (nn.Linear,)
          ) -> Tuple[Report, List[Dict[str, nn.Linear]], Dict[str, nn.Linear]]:
    """Which layers (of layer_types) each block calibrates, the ones outside every block, and the skips."""
    tied = _tied_to_embedding(model)
    report = Report()
    per_block: List[Dict[str, nn.Linear]] = [dict() for _ in blocks]
    outside: Dict[str, nn.Linear] = {}
    prefixes = [(i, name + "." if name else "") for i, (name, _) in enumerate(blocks)]
    for name, mod in model.named_modules():
        if not name:
            continue
        if type(mod) in layer_types:
            reason = filter_reason(name, mod, cfg, tied) or check(cfg, name, mod)
            if reason:
                report.changes.append(LayerChange(name, type(mod).__name__, "skipped",
                                                  bytes_before=module_bytes(mod), reason=reason))
                continue
            for i, prefix in prefixes:
                if name.startswith(prefix) or name == blocks[i][0]:  # inside the block, or the block
                    per_block[i][name[len(prefix):] if name != blocks[i][0] else ""] = mod
                    break
            else:
                outside[name] = mod
        elif _is_weight_matrix_layer(mod):
            report.changes.append(LayerChange(
                name, type(mod).__name__, "skipped", bytes_before=module_bytes(mod),
                reason=f"{type(mod).__name__} layers are not supported by this technique"))
        elif (row := held_weights_row(name, mod)) is not None:
            report.changes.append(row)
    return report, per_block, outside


def reached_targets(block: nn.Module, targets: Dict[str, nn.Linear], inputs: Inputs) -> Set[str]:
    """The targets that run on at least one calibration batch. Stops at the call by which every
    target has run, so it usually costs part of one batch's forward pass."""
    ran: Set[str] = set()

    def hook(name):
        def fn(mod, args):
            ran.add(name)
            if len(ran) == len(targets):
                raise _BatchDone
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        for inp in inputs:
            try:
                run_block(block, inp)
            except _BatchDone:
                break
    finally:
        for h in handles:
            h.remove()
    return ran


def _full(block_name: str, local: str) -> str:
    return ".".join(p for p in (block_name, local) if p)


def _never_ran(block_name: str, targets: Dict[str, nn.Linear]) -> List[LayerChange]:
    """The skip rows of targets no calibration batch ran."""
    return [LayerChange(_full(block_name, n), type(m).__name__, "skipped", bytes_before=module_bytes(m),
                        reason=NEVER_RAN) for n, m in targets.items()]


def _drop_unreached(block: nn.Module, bname: str, targets: Dict[str, nn.Linear], inputs: Inputs
                    ) -> Tuple[Dict[str, nn.Linear], List[LayerChange]]:
    """The targets the calibration data reaches, and a skip row for every other one."""
    if not targets:
        return targets, []
    ran = reached_targets(block, targets, inputs)
    skipped = _never_ran(bname, {n: m for n, m in targets.items() if n not in ran})
    return {n: m for n, m in targets.items() if n in ran}, skipped


def check_all_reached(model: nn.Module, targets: Dict[str, nn.Linear], forward_loop: ForwardLoop) -> None:
    """unreached="error": one float pass with every target hooked, raising check_reached's
    error naming every layer it never ran, before anything changes."""
    ran: Set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: ran.add(n)) for n, m in targets.items()]
    try:
        with torch.no_grad(), no_cache(model):
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    check_reached(n for n in targets if n not in ran)


def calibrate_blockwise(model: nn.Module, cfg, forward_loop: Optional[ForwardLoop], spec: Optional[WeightSpec],
                        quantize_block: BlockFn, check: Callable, name: str,
                        feed_quantized: bool, progress: bool = True, float_reference: bool = False,
                        outside: Optional[Callable[[nn.Linear], Tuple[nn.Module, str]]] = None,
                        action: str = "quantized", float_outputs: bool = False,
                        layer_types: Tuple[type, ...] = (nn.Linear,)) -> Report:
    """Quantize every selected Linear of `model` block by block with `quantize_block`.

    feed_quantized: the next block sees the quantized block's outputs (GPTQ, so later blocks
    correct earlier errors) or the float block's (AWQ, as the paper does).
    float_reference (with feed_quantized): also carry the float model's own block inputs and
    hand quantize_block a FloatReference (a float copy of the block, so peak memory grows by
    one block and one set of activations), for methods that fit the float outputs.
    Linear layers outside every block are quantized with round-to-nearest (noted in the report),
    or given to `outside(linear) -> (module, note)` (families other than quantization).
    action: the report's verb for the layers changed ("quantized", "sparsified").
    float_outputs (without feed_quantized): quantize_block takes a keyword `outputs`, a list it
    fills with the float block's output on every input (from a pass it makes anyway), so the
    pipeline does not run the block once more for the next block's inputs.
    Target layers no calibration batch reaches: cfg.unreached (see the module's docstring).
    layer_types: the layers calibrated (ts.sparsify adds nn.Conv1d / nn.Conv2d; the hooks'
    statistics take their rows from token_mask.layer_rows).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    forward_loop = require_forward_loop(forward_loop, name.upper())
    with eval_mode(model):  # the block runs too: no BatchNorm statistics moved, no dropout
        return _calibrate_blocks(model, cfg, forward_loop, spec, quantize_block, check, name, feed_quantized,
                                 progress, float_reference, outside, action, float_outputs, layer_types)


def _calibrate_blocks(model, cfg, forward_loop, spec, quantize_block, check, name, feed_quantized, progress,
                      float_reference, outside, action, float_outputs, layer_types) -> Report:
    stacks = find_block_stacks(model)
    blocks = [b for stack in stacks for b in stack]
    report, per_block, outside_layers = plan_layers(model, cfg, blocks, check, layer_types)
    mode = getattr(cfg, "unreached", "skip")
    fallback = outside or _round_to_nearest(spec)  # what needs no data
    edits = Edits()
    changes: List[LayerChange] = []
    unreached: List[LayerChange] = []

    def run_stack(lo: int, hi: int) -> None:
        """Blocks lo..hi-1 (one stack): capture the first target block's inputs, then each
        block's inputs are the previous block's outputs."""
        first = next((i for i in range(lo, hi) if per_block[i]), None)
        if first is None:
            return
        inputs = capture_block_inputs(model, blocks[first][1], forward_loop, allow_none=mode != "error")
        if not inputs:  # a stack the data never enters (a vision tower under text-only data): unreached
            for i in range(first, hi):
                unreached.extend(_never_ran(blocks[i][0], per_block[i]))
            return
        float_inputs: Optional[Inputs] = None  # None: still equal to inputs
        bar = tqdm(blocks[first:hi], desc=f"{name} blocks", disable=not progress, leave=False)
        for bi, (bname, block) in enumerate(bar, start=first):
            targets, skipped = _drop_unreached(block, bname, per_block[bi], inputs)
            if mode == "error":  # the float pass reached them: the calibrated blocks before did not
                check_reached(c.name for c in skipped)
            unreached.extend(skipped)
            last = bi == hi - 1 or not any(per_block[bi + 1:hi])
            outs = None
            if not feed_quantized and not last and not (float_outputs and targets):
                outs = [run_block(block, inp) for inp in inputs]
            before = {n: (type(m).__name__, module_bytes(m)) for n, m in targets.items()}
            reference = None
            if float_reference and targets:
                reference = FloatReference(copy.deepcopy(block), float_inputs or inputs)
            extra = (reference,) if float_reference else ()
            kw = {}
            if float_outputs and not feed_quantized and not last and targets:
                outs = kw["outputs"] = []
            with errors_named(f"block '{bname}'"):  # which block (the algorithm may name the layer)
                new = quantize_block(block, targets, inputs, edits, *extra, **kw) if targets else {}
            if outs is not None and len(outs) != len(inputs):
                raise RuntimeError(f"{name}: quantize_block gave {len(outs)} block outputs for "
                                   f"{len(inputs)} inputs")
            for local, (mod, note) in new.items():
                full = _full(bname, local)
                set_submodule(model, full, mod, edits)
                changes.append(LayerChange(full, before[local][0], action, note, before[local][1],
                                           module_bytes(mod)))
            block = model.get_submodule(bname) if bname else model  # it may have been replaced
            if last:
                break
            if outs is None:
                outs = [run_block(block, inp) for inp in inputs]
            if float_reference:  # the float model's next inputs, from the float copy
                ref_block = reference.block if reference is not None else block
                float_inputs = [next_inputs(inp, run_block(ref_block, inp)) for inp in float_inputs or inputs]
                del reference
            inputs = [next_inputs(inp, out) for inp, out in zip(inputs, outs)]

    try:
        if mode == "error" and any(per_block):
            check_all_reached(model, {_full(bname, n): m for (bname, _), targets in zip(blocks, per_block)
                                      for n, m in targets.items()}, forward_loop)
        if any(per_block):
            lo = 0
            for stack in stacks:
                run_stack(lo, lo + len(stack))
                lo += len(stack)
            if not changes:
                raise ValueError(f"none of the {len(unreached)} layers to calibrate ran on the calibration "
                                 f"data (e.g. '{unreached[0].name}'): is the calibration data empty, does the "
                                 f"forward loop run the model, or are its blocks containers the model never "
                                 f"calls itself (a ModuleList of ModuleLists)?")
        fallen = [(c.name, UNREACHED_NOTE) for c in unreached] if mode == "fallback" else []
        kinds = {c.name: c.module_type for c in unreached}
        kinds.update((n, type(m).__name__) for n, m in outside_layers.items())
        for full, why in [(n, "outside the calibrated blocks") for n in outside_layers] + fallen:
            lin = model.get_submodule(full)  # with whatever a block's edits (AWQ's folds) gave it
            mod, note = fallback(lin)
            set_submodule(model, full, mod, edits)
            changes.append(LayerChange(full, kinds[full], action, f"{note} ({why})", module_bytes(lin),
                                       module_bytes(mod)))
    except BaseException as e:
        edits.undo()
        if isinstance(e, (ValueError, TypeError)):
            raise type(e)(f"{name}: {e}") from e
        raise
    warn_unreached(name.upper(), [c.name for c in unreached], mode)
    report.changes.extend(([] if mode == "fallback" else unreached) + changes)
    remember_skipped(model, report)
    return report


def _round_to_nearest(spec: WeightSpec):
    def quantize(lin: nn.Linear) -> Tuple[nn.Module, str]:
        from ..ops import calibration as C

        codes, scales, zps = C.quantize_codes_reference(lin.weight.detach(), spec.bits, spec.symmetric,
                                                        spec.group_for(lin.in_features))
        return make_layer(lin, codes, scales, zps, spec), f"{spec.describe(lin.in_features)} rtn"
    return quantize


def warn_damping(layer: str, asked: float, used: float) -> None:
    warnings.warn(f"GPTQ {layer}: H + {asked:g} x mean(diag H) was not positive definite; "
                  f"damping raised to {used:g}", RuntimeWarning, stacklevel=3)
