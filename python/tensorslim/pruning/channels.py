"""ChannelPrune: remove whole channels / neurons / heads, so layers physically shrink.

1. Spaces of coupled channels: transformer blocks by their module structure
   (channel_rules), anything else from a torch.fx trace on example inputs (channel_graph),
   or, where fx cannot trace, from the autograd graph of one forward pass (autograd_graph).
2. Per space, an importance per channel summed over every coupled slice (l1 / l2 / taylor
   |w * grad|; wanda |w| * ||x|| over the consumers' columns only) or random; the kept count
   is round(size * (1 - ratio)), rounded up to round_to. compensate: the consumers' biases
   take the removed channels' mean contribution (input_stats.py).
3. Every smaller tensor is built (rows / columns gathered by the C++ core), then all are
   swapped in with the modules' size attributes, so any error leaves the model as it was.
   torch's nn.MultiheadAttention is unpacked first where heads may go (attention_heads.py) and
   packed again where all of them stay.
4. With an example batch (calib_data or example_inputs), the pruned model must give what the
   original gives with the removed channels zeroed (verify.py); else everything is put back
   and the error says so: a pattern the graph misread never leaves a broken or wrong model.
"""
import collections
import contextlib
import dataclasses
import inspect
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..attention import UnpackedAttention
from ..conv1d import feature_dims
from ..ops import prune as prune_ops
from ..quantization import token_mask
from ..quantization.calibrate import call_model, model_device
from .._user_warning import warn_user
from ..report import LayerChange, Report, module_bytes
from ..transforms import _tied_to_embedding, filter_reason, float_weight
from . import channel_graph, channel_rules, expert_neurons, masks, verify
from .attention_heads import add_head_spaces, hf_layout, per_head_masks
from .channel_space import Space, Spaces
from .config import ChannelPrune
from .input_stats import InputStats, bias_shifts, input_stats, wanda_columns
from .size_attrs import get_size, set_size

STRUCTURED_ATTR = "_tensorslim_structured"  # {module name: {attribute: value}} for ts.save
UNPRUNED_BYTES_ATTR = "_tensorslim_unpruned_bytes"  # {module name: bytes before any channel left}: summary
ADDED_BIASES_ATTR = "_tensorslim_added_biases"  # [names of linears compensate gave a bias]: ts.save


def _example_batch(calib_data, example_inputs):
    """One batch to run the model on (call_model's forms: a tensor, a tuple, a dict), or None."""
    if example_inputs is not None:
        return example_inputs
    if calib_data is not None:
        return calib_data if isinstance(calib_data, torch.Tensor) else next(iter(calib_data), None)
    return None


def _example(model: nn.Module, calib_data, example_inputs) -> tuple:
    """The example batch as positional arguments of model.forward (a dict batch bound by name)."""
    batch = _example_batch(calib_data, example_inputs)
    if batch is None:
        raise ValueError("ChannelPrune: tracing the channel graph needs example inputs: pass calib_data "
                         "or example_inputs=")
    if isinstance(batch, dict) or hasattr(batch, "items"):  # a tokenizer's BatchEncoding too
        try:
            bound = inspect.signature(model.forward).bind(**dict(batch.items()))
        except TypeError as e:
            raise ValueError(f"ChannelPrune: the example batch does not match the model's forward: {e}") from None
        params = inspect.signature(model.forward).parameters
        extra = bound.arguments.get(next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None))
        if extra:  # the trace passes the batch positionally: a key only **kwargs takes has no place
            raise ValueError(f"ChannelPrune: the example batch's keys {sorted(extra)} are not named parameters "
                             f"of {type(model).__name__}.forward; leave them out of the example")
        # up to the last parameter the batch names, defaults between: the parameters after it are
        # not passed at all (a decorator filling one by keyword, transformers' use_cache, then
        # met it twice: "got multiple values for argument")
        positional = [n for n, p in params.items()
                      if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        last = max((positional.index(n) for n in bound.arguments if n in positional), default=-1)
        return tuple(bound.arguments[n] if n in bound.arguments else params[n].default
                     for n in positional[:last + 1])
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


# why an nn.MultiheadAttention a soft-masking Schedule meets keeps its heads
SCHEDULE_PACKED = ("ts.pruning.Schedule masks the optimizer's parameters in place: call "
                   "ts.unpack_attention(model) before creating the optimizer to prune its heads")


def build_spaces(model: nn.Module, cfg: ChannelPrune, calib_data, example_inputs, packed_hint: Optional[str] = None,
                 guess: bool = True, kept_hint: Optional[str] = None) -> Spaces:
    """guess: read the autograd graph's token folds and feature splits as keeping channels (a
    model whose code sizes them from the channel count fails the check, and is read again
    without: see _prune_channels)."""
    heads = cfg.head_ratio != 0
    if channel_rules.find_blocks(model):  # Hugging Face blocks
        sp = channel_rules.build_spaces(model, heads=heads)
    else:
        example = _example(model, calib_data, example_inputs)
        keep_heads: Dict[str, str] = {}
        with per_head_masks(model, keep_heads):  # the trace runs the example batch
            try:
                gm = channel_graph.trace(model, example)
            except ValueError as fx_error:  # data-dependent control flow etc.: the operations actually run
                from . import autograd_graph

                try:
                    gm = autograd_graph.trace(model, example, guess)
                except ValueError as e:
                    raise verify.ModelRunError(f"{fx_error}; {e}") from None
        sp = channel_graph.build_spaces(model, gm, follow_splits=guess)
        sp.keep_heads.update(keep_heads)
        sp.guesses += gm.meta.get("token_folds", 0)
    channel_rules.add_torch_layer_spaces(sp, model)
    if heads:
        add_head_spaces(sp, model, cfg.exclude, packed_hint, kept_hint)
    return sp


def _loss(out, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The scalar Taylor importance differentiates: the model's own loss when it returns one
    (Hugging Face outputs with labels), else the mean square of its main output, over the real
    tokens where the batch has padding (`real`, [B, T], from its attention_mask)."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    main = next((getattr(out, k) for k in ("logits", "last_hidden_state")
                 if isinstance(getattr(out, k, None), torch.Tensor)), None)
    if main is None:
        main = next((t for t in verify.output_tensors(out) if t.is_floating_point()), None)
    if main is None:
        raise ValueError(f"ChannelPrune: importance='taylor' found no float tensor in the model's output "
                         f"({type(out).__name__}) to differentiate")
    if real is not None and main.dim() >= 3 and tuple(main.shape[:2]) == tuple(real.shape):  # [B, T, ...]
        main = main[real.to(main.device)]
    return main.float().pow(2).mean()


def taylor_grads(model: nn.Module, calib_data, forward_loop) -> Dict[str, torch.Tensor]:
    """dL/dw summed over the calibration batches; the model's .grad fields and mode are restored."""
    if calib_data is None and forward_loop is None:
        raise ValueError("ChannelPrune: importance='taylor' needs calib_data or forward_loop (gradients)")
    params = dict(model.named_parameters())
    saved = {n: p.grad for n, p in params.items()}
    frozen = [p for p in params.values() if not p.requires_grad and p.is_floating_point()]
    modes = [(m, m.training) for m in model.modules()]  # each module's own, restored after
    try:  # eval: no BatchNorm statistics moved, no dropout in the gradients
        for p in params.values():
            p.grad = None
        for p in frozen:  # frozen for training, not unimportant: their gradients count too
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            if forward_loop is not None:
                forward_loop(model)  # runs forward and backward itself
            else:
                batches = [calib_data] if isinstance(calib_data, torch.Tensor) else calib_data
                for batch in batches:
                    _loss(call_model(model, batch), token_mask.of_batch(batch)).backward()
        if all(p.grad is None for p in params.values()):  # else every channel scores 0: index order
            raise ValueError("ChannelPrune: importance='taylor' got no gradients (empty calib_data, or a "
                             "forward_loop that did not run the model and call backward)")
        return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for n, p in params.items():
            p.grad = saved[n]
        for m, training in modes:
            m.training = training


def importance_data(model: nn.Module, cfg: ChannelPrune, calib_data, forward_loop):
    """What the data-driven importances need: taylor's gradients, wanda's input statistics
    (InputStats), else None."""
    if cfg.importance == "taylor":
        return taylor_grads(model, calib_data, forward_loop)
    if cfg.importance == "wanda":
        return input_stats(model, calib_data, forward_loop, "importance='wanda'")
    return None


def _channel_scores(space: Space, mods: Dict[str, nn.Module], cfg: ChannelPrune, grads, sid: int) -> torch.Tensor:
    """grads: importance_data's (taylor's gradients, wanda's InputStats)."""
    if cfg.importance == "random":
        return torch.rand(space.size, generator=torch.Generator().manual_seed(cfg.seed * 100003 + sid),
                          dtype=torch.float64)
    score = torch.zeros(space.size, dtype=torch.float64)
    if cfg.importance == "wanda":
        for sl in space.slices:
            x = wanda_columns(sl, mods, grads.norms)
            if x is not None:
                x = x.movedim(1, 0)[sl.offset:sl.offset + space.size * sl.rep]
                score += x.reshape(space.size, -1).sum(1)
        return score
    p = 2 if cfg.importance == "l2" else 1
    for sl in space.slices:
        t = getattr(mods[sl.module], sl.param)
        if not isinstance(t, nn.Parameter):
            continue  # running statistics carry no importance
        x = t.detach().float()
        if cfg.importance == "taylor":
            x = x * grads[f"{sl.module}.{sl.param}"].float()
        x = x.movedim(sl.dim, 0)[sl.offset:sl.offset + space.size * sl.rep].contiguous()
        # |x|^p per weight in the core (the unstructured pruner's score kernel), summed per
        # channel in float64 so the order of a channel's terms cannot change its rank.
        score += prune_ops.scores(x, p).double().reshape(space.size, -1).sum(1)
    return score


def _keep_count(space: Space, cfg: ChannelPrune) -> int:
    ratio = cfg.ratio if space.kind != "heads" or cfg.head_ratio == "same" else cfg.head_ratio
    keep = round(space.size * (1.0 - ratio))
    if keep == 0:
        heads = space.kind == "heads"
        which = ("head_ratio" + (' ("same": ratio)' if cfg.head_ratio == "same" else "")) if heads else "ratio"
        raise ValueError(f"layer '{space.producers[0]}': {which} {ratio} leaves 0 of its {space.size} {space.kind}; "
                         f"use a smaller one" + ("; head_ratio=0 keeps every head" if heads else ""))
    if space.kind != "heads":
        # equal blocks stay equal; round_to counts channels, a unit may hold several (GroupNorm)
        step = math.lcm(cfg.round_to // math.gcd(cfg.round_to, space.width), space.groups)
        keep = min(space.size, math.ceil(keep / step) * step)
    return keep


def _drop(scores: torch.Tensor, keep: int, groups: int) -> List[int]:
    """The channels to remove: the lowest scores, taken equally from each of `groups` blocks."""
    size = len(scores)
    block, per = size // groups, (size - keep) // groups
    drop = []
    for g in range(groups):
        order = torch.argsort(scores[g * block:(g + 1) * block], stable=True)
        drop += [g * block + int(i) for i in order[:per]]
    return sorted(drop)


def _skip_reason(space: Space, mods, cfg, tied, shared) -> Optional[str]:
    if space.frozen:
        return f"coupled with the {space.frozen[0]}"
    if space.unsupported:  # kept whole, with why: the rest of the model still prunes
        return f"cannot be pruned consistently: {space.unsupported[0]}"
    for name in space.producers:
        reason = filter_reason(name, mods[name], cfg, tied)
        if reason:
            return reason
    for name in dict.fromkeys(sl.module for sl in space.slices):  # producers and consumers
        m = mods[name]
        if parametrize.is_parametrized(m) or any(type(h).__name__ in ("WeightNorm", "SpectralNorm")
                                                 for h in m._forward_pre_hooks.values()):
            return f"layer '{name}' computes its weight (weight_norm / spectral_norm); remove that first"
        if any(id(p) in shared for p in m._parameters.values() if p is not None):
            return f"layer '{name}' shares a weight with another module (tied)"
    return None


def _shared_parameters(model: nn.Module) -> set:
    """ids of parameters held by more than one module (tied weights)."""
    held = collections.Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    return {i for i, n in held.items() if n > 1}


def plan(model: nn.Module, spaces: Spaces, cfg: ChannelPrune, grads, chosen: Optional[dict] = None,
         forced: Optional[dict] = None, allow_masked: bool = False) -> Tuple[dict, dict, Report]:
    """(removed indices per (module, param, dim), attribute decrements per (module, attr), report
    of skipped spaces); raises on a selected space that cannot be pruned consistently.
    chosen (filled) / forced (used): {first producer: dropped channels} of each space."""
    mods = dict(model.named_modules())
    tied, shared = _tied_to_embedding(model), _shared_parameters(model)
    removed: Dict[Tuple[str, str, int], List[int]] = {}
    dec: Dict[Tuple[str, str], int] = {}
    report = Report()
    no_grad: List[str] = []  # spaces the taylor gradients / wanda activations never reached
    for sid, space in spaces.roots().items():
        if not space.producers:
            continue
        reason = _skip_reason(space, mods, cfg, tied, shared)
        if reason:
            report.changes.append(LayerChange(space.producers[0], type(mods[space.producers[0]]).__name__, "skipped",
                                              bytes_before=module_bytes(mods[space.producers[0]]),
                                              reason=f"{space.kind}: {reason}"))
            continue
        for name in {sl.module for sl in space.slices}:
            if masks.is_masked(mods[name]) and not allow_masked:
                raise ValueError(f"layer '{name}' carries an unstructured mask; call ts.pruning.finalize first")
        if forced is not None:
            drop = sorted(forced.get(space.producers[0], []))
        else:
            keep = _keep_count(space, cfg)
            score = _channel_scores(space, mods, cfg, grads, sid)
            if cfg.importance in ("taylor", "wanda") and not score.any():  # no data reached it: index order else
                score = _channel_scores(space, mods, dataclasses.replace(cfg, importance="l1"), None, sid)
                no_grad.append(space.producers[0])
            drop = _drop(score, keep, space.groups)
        if chosen is not None:
            chosen[space.producers[0]] = drop
        if not drop:
            continue
        for sl in space.slices:
            idx = [sl.offset + c * sl.rep + r for c in drop for r in range(sl.rep)]
            removed.setdefault((sl.module, sl.param, sl.dim), []).extend(idx)
        for name, attr, per in space.attrs:
            dec[(name, attr)] = dec.get((name, attr), 0) + len(drop) * per
    if no_grad:
        what = ("gradients never reached" if cfg.importance == "taylor" else
                "activations never reached a linear / ungrouped conv reading")
        warn_user(f"ChannelPrune: the calibration data's {what} the channels of {no_grad} (a branch it does not "
                  f"take): those are ranked by their l1 norms instead of {cfg.importance} importance")
    return removed, dec, report


def _gather(t: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """t's slices `keep` along dim, through the C++ row gather."""
    moved = t.detach().movedim(dim, 0)
    rows = prune_ops.gather_rows(moved.reshape(moved.shape[0], -1), keep)
    return rows.reshape((len(keep),) + tuple(moved.shape[1:])).movedim(0, dim).contiguous()


def scheduled_final(cfg: ChannelPrune) -> float:
    """What a Schedule's ratio runs up to: the larger of the channel and head ratios (a
    heads-only config, ratio=0, pruned nothing under a schedule that followed `ratio`)."""
    return max(float(cfg.ratio), 0.0 if cfg.head_ratio == "same" else float(cfg.head_ratio))


def soft_prune_channels(model: nn.Module, cfg: ChannelPrune, ratio: float, calib_data=None, forward_loop=None,
                        example_inputs=None, chosen: Optional[dict] = None) -> Report:
    """Mask (zero) the weight rows and columns of the channels a ChannelPrune at `ratio` would
    remove, leaving shapes alone, so an optimizer keeps training the same parameters
    (ts.pruning.Schedule). With the consumers' columns zeroed the model computes exactly what
    the physically pruned one will; Schedule.finalize removes them."""
    # `ratio` runs up to the larger of the two targets (Schedule._final), each taken that far
    final = scheduled_final(cfg)
    frac = min(1.0, ratio / final) if final > 0 else 0.0
    head = frac * cfg.ratio if cfg.head_ratio == "same" else frac * cfg.head_ratio
    step_cfg = dataclasses.replace(cfg, ratio=frac * cfg.ratio, head_ratio=head)
    spaces = build_spaces(model, step_cfg, calib_data, example_inputs, SCHEDULE_PACKED)
    grads = importance_data(model, cfg, calib_data, forward_loop)
    removed, _, report = plan(model, spaces, step_cfg, grads, chosen=chosen, allow_masked=True)
    mods = dict(model.named_modules())
    new_masks = {}
    for (name, param, dim), idx in removed.items():
        if param != "weight":
            continue
        m = mods[name]
        keep = new_masks.get(name)
        if keep is None:
            keep = torch.ones(m.weight.shape, dtype=torch.bool)  # a fresh set: channels may come back
        keep.index_fill_(dim, torch.tensor(idx), False)
        new_masks[name] = keep
    for name, m in mods.items():
        if name not in new_masks and masks.is_masked(m):
            new_masks[name] = torch.ones(m.weight.shape, dtype=torch.bool)
    for name, keep in new_masks.items():
        masks.attach(mods[name], keep)
        report.changes.append(LayerChange(name, type(mods[name]).__name__, "pruned",
                                          f"channels masked: {masks.sparsity(mods[name]):.1%} zeros",
                                          module_bytes(mods[name]), module_bytes(mods[name])))
    return _partly_kept(report)


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """The forwards run inside (the trace, Taylor gradients, the check) leave the model's buffers
    as they were: a counter or moving average a forward updates, on success or error alike.
    Buffers pruning replaced (smaller now) are the new ones."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        mods = dict(model.named_modules())
        with torch.no_grad():
            for n, b in saved.items():
                owner, _, attr = n.rpartition(".")
                cur = mods[owner]._buffers.get(attr) if owner in mods else None
                if cur is not None and cur.shape == b.shape and cur.dtype == b.dtype:
                    cur.copy_(b)


def prune_channels(model: nn.Module, cfg: ChannelPrune, calib_data=None, forward_loop=None,
                   example_inputs=None, progress: bool = True, forced: Optional[dict] = None) -> Report:
    if forced is not None:  # Schedule.finalize: what the soft masks chose (experts are not masked)
        return _channels_and_heads(model, cfg, calib_data, forward_loop, example_inputs, forced)
    # fused MoE experts: chosen (a ratio leaving an expert none refused) before anything changes
    chosen, rows = expert_neurons.selected(expert_neurons.fused_experts(model), cfg)
    report = _channels_and_heads(model, cfg, calib_data, forward_loop, example_inputs, forced)
    report.changes += rows
    if chosen:
        record, unpruned = getattr(model, STRUCTURED_ATTR, {}), getattr(model, UNPRUNED_BYTES_ATTR, {})
        with _buffers_kept(model), torch.random.fork_rng(devices=verify.rng_devices(model_device(model))):
            grads = taylor_grads(model, calib_data, forward_loop) if cfg.importance == "taylor" else None
            report.changes += expert_neurons.prune_expert_neurons(chosen, cfg, grads, record, unpruned)
        object.__setattr__(model, STRUCTURED_ATTR, record)
        object.__setattr__(model, UNPRUNED_BYTES_ATTR, unpruned)
    return report


def _channels_and_heads(model: nn.Module, cfg: ChannelPrune, calib_data, forward_loop, example_inputs,
                        forced: Optional[dict]) -> Report:
    # nor the caller's random streams
    with _buffers_kept(model), torch.random.fork_rng(devices=verify.rng_devices(model_device(model))):
        if cfg.head_ratio == 0 or forced is not None:  # Schedule.finalize: soft masks never unpacked
            return _with_hf_heads_kept_on_failure(model, cfg, calib_data, forward_loop, example_inputs, forced)
        # torch's nn.MultiheadAttention holds no fewer heads than its width: unpacked while
        # pruning (attention_heads.py), packed again where every head stayed
        attention = UnpackedAttention(model)
        attention.unpack()
        try:
            report = _with_hf_heads_kept_on_failure(model, cfg, calib_data, forward_loop, example_inputs, forced)
        except verify.ModelRunError as e:
            attention.restore_all()
            if not attention.swapped:
                raise
            # model code reading the packed weights, attention weights used where the trace
            # cannot see it: once more with every attention packed, its heads kept (with why)
            first = _first_line(e)
            return _prune_channels(model, cfg, calib_data, forward_loop, example_inputs, forced,
                                   f"the model did not prune with it unpacked: {first}",
                                   f"the model did not prune with its heads removed: {first}")
        except BaseException:
            attention.restore_all()
            raise
        whole = [n for n, (old, new) in attention.swapped.items() if new.num_heads == old.num_heads]
        return attention.put_back(whole, report, "every head kept")


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _with_hf_heads_kept_on_failure(model: nn.Module, cfg: ChannelPrune, calib_data, forward_loop, example_inputs,
                                   forced: Optional[dict]) -> Report:
    """_prune_channels, once more with the heads of every Hugging Face attention kept (its row
    says why) where the check fails and the model has such attentions: model code sizing its
    heads from the full width (`reshape(b, t, x.shape[-1])`, `self.hidden_size`)."""
    try:
        return _prune_channels(model, cfg, calib_data, forward_loop, example_inputs, forced)
    except verify.ModelRunError as e:
        if cfg.head_ratio == 0 or not _rule_free_hf_attentions(model):
            raise
        return _prune_channels(model, cfg, calib_data, forward_loop, example_inputs, forced, None,
                               f"the model did not prune with its heads removed: {_first_line(e)}")


def _rule_free_hf_attentions(model: nn.Module) -> bool:
    """Whether the model has a Hugging Face style attention outside the blocks a rule covers
    (those heads come from attention_heads.py, the rest from the block rules)."""
    inside = tuple(f"{b}." for b in channel_rules.find_blocks(model))
    return any(hf_layout(m) is not None and not (name + ".").startswith(inside) for name, m in model.named_modules())


def _prune_channels(model: nn.Module, cfg: ChannelPrune, calib_data, forward_loop, example_inputs,
                    forced: Optional[dict], packed_hint: Optional[str] = None,
                    kept_hint: Optional[str] = None) -> Report:
    hint = SCHEDULE_PACKED if forced is not None else packed_hint
    try:
        return _prune_traced(model, cfg, calib_data, forward_loop, example_inputs, forced, hint, True, kept_hint)
    except verify.ModelRunError as e:
        if not getattr(e, "guesses", 0):
            raise
        # token folds or feature splits were read as keeping channels, and the check failed:
        # model code that sizes a reshape (`C // heads`) or a split (`split(64)`) from the
        # channel count; those stay opaque now
        return _prune_traced(model, cfg, calib_data, forward_loop, example_inputs, forced, hint, False, kept_hint)


def _prune_traced(model: nn.Module, cfg: ChannelPrune, calib_data, forward_loop, example_inputs,
                  forced: Optional[dict], hint: Optional[str], guess: bool, kept_hint: Optional[str]) -> Report:
    spaces = build_spaces(model, cfg, calib_data, example_inputs, hint, guess, kept_hint)
    grads = importance_data(model, cfg, calib_data, forward_loop) if forced is None else None
    removed, dec, report = plan(model, spaces, cfg, grads, forced=forced)
    if removed and spaces.untraced:
        shown = ", ".join(repr(n) for n in spaces.untraced[:4]) + (", ..." if len(spaces.untraced) > 4 else "")
        warn_user(f"ChannelPrune: layers {shown} did not run on the example batch (a training-only head, a "
                  f"branch other inputs take): they keep their input widths, so where they read pruned "
                  f"channels the model fails when they run. Prune with those paths running (model.train() "
                  f"for training-only heads) or exclude the layers feeding them")
    mods = dict(model.named_modules())
    # compensate: consumers' biases (full length) with the removed channels' mean contribution
    shifted = _compensated_biases(model, mods, removed, grads, calib_data, forward_loop) \
        if cfg.compensate and removed else {}
    new: Dict[Tuple[str, str], torch.Tensor] = {}
    for (name, param, dim), idx in removed.items():  # build everything before touching the model
        key = (name, param)
        t = new.get(key, shifted[name] if param == "bias" and name in shifted else getattr(mods[name], param))
        gone = set(idx)
        if len(gone) != len(idx) or max(gone) >= t.shape[dim]:  # two spaces claiming one index
            raise ValueError(f"layer '{name}': the channel graph removes {param} indices along dim {dim} "
                             f"inconsistently (one twice, or past its size {t.shape[dim]}); leave it out with "
                             f"exclude=[{name!r}]")
        keep = torch.tensor([i for i in range(t.shape[dim]) if i not in gone], dtype=torch.int64)
        new[key] = _gather(t, dim, keep).to(t.dtype)
    for name, bias in shifted.items():  # a consumer that had no bias: its output rows as its weight's
        if (name, "bias") not in new:
            gone = set(removed.get((name, "weight", feature_dims(mods[name])[0]), []))
            kept = torch.tensor([i for i in range(bias.shape[0]) if i not in gone], dtype=torch.int64)
            new[(name, "bias")] = _gather(bias, 0, kept).to(bias.dtype) if gone else bias
    attrs = {(n, a): get_size(mods[n], a) - d for (n, a), d in dec.items()}
    for (n, a), v in attrs.items():
        if v <= 0:
            raise ValueError(f"layer '{n}': pruning would leave {a} = {v}")
    before = {n: module_bytes(mods[n]) for n in {k[0] for k in new}}
    batch = _example_batch(calib_data, example_inputs)
    old_tensors = {key: getattr(mods[key[0]], key[1]) for key in new}  # before any forward runs
    expected = verify.without_channels(model, batch, removed, {f"{n}.bias": b for n, b in shifted.items()}) \
        if batch is not None and removed else None
    old_attrs = {key: get_size(mods[key[0]], key[1]) for key in attrs}
    def put(tensors: dict, sizes: dict) -> None:
        for (name, param), t in tensors.items():
            old = getattr(mods[name], param)
            if t is None:  # putting back a linear's missing bias, one compensate added
                setattr(mods[name], param, None)
            elif isinstance(old, nn.Parameter) or old is None:
                if not isinstance(t, nn.Parameter):
                    t = nn.Parameter(t, requires_grad=(mods[name].weight if old is None else old).requires_grad)
                setattr(mods[name], param, t)
            else:
                mods[name]._buffers[param] = t
        for (n, a), v in sizes.items():
            set_size(mods[n], a, v)

    put(new, attrs)
    if expected is not None:
        try:
            verify.same_outputs(model, batch, expected)
        except BaseException as e:
            put(old_tensors, old_attrs)
            e.guesses = spaces.guesses  # read by _prune_channels
            raise
    added = [n for n in shifted if old_tensors[(n, "bias")] is None]
    if added:  # ts.save names them, so that ts.load gives a fresh model those biases
        object.__setattr__(model, ADDED_BIASES_ATTR, sorted(set(getattr(model, ADDED_BIASES_ATTR, [])) | set(added)))
    record = getattr(model, STRUCTURED_ATTR, {})
    for (n, a), v in attrs.items():
        record.setdefault(n, {})[a] = v
    for n in sorted(before):
        record.setdefault(n, {})
    object.__setattr__(model, STRUCTURED_ATTR, record)
    unpruned = getattr(model, UNPRUNED_BYTES_ATTR, {})
    for n, b in before.items():
        unpruned.setdefault(n, b)  # pruned again: still the first size
    object.__setattr__(model, UNPRUNED_BYTES_ATTR, unpruned)
    for n in sorted(before):
        m = mods[n]
        w = float_weight(m)
        shapes = {"weight": w} if w is not None else dict(m.named_parameters(recurse=False))  # GPT-OSS's sinks
        what = ", ".join(f"{pn} {'x'.join(str(d) for d in t.shape)}" for pn, t in shapes.items())
        report.changes.append(LayerChange(n, type(m).__name__, "pruned", f"channels removed: {what}",
                                          before[n], module_bytes(m)))
    for row in report.changes:
        if row.name in shifted:
            what = "a bias added: " if row.name in added else "bias += "
            row.reason = "; ".join(t for t in (row.reason, f"{what}the removed channels' mean contribution") if t)
    sizes: Dict[str, Dict[str, str]] = {}
    for (n, a), v in attrs.items():
        sizes.setdefault(n, {})[a] = f"{old_attrs[(n, a)]} -> {v}"
    _note_holder_sizes(report.changes, sizes, mods)
    return _partly_kept(report)


def _compensated_biases(model: nn.Module, mods: Dict[str, nn.Module], removed, grads, calib_data, forward_loop
                        ) -> Dict[str, torch.Tensor]:
    """{consumer name: its bias (zeros for a linear without one) + the mean contribution of the
    input features it loses}, full length, in the weight's dtype and device (ChannelPrune
    compensate); the input means come from wanda's pass when it ran, else from one of their own."""
    stats = grads if isinstance(grads, InputStats) else input_stats(model, calib_data, forward_loop,
                                                                     "compensate=True")
    out = {}
    for name, shift in bias_shifts(mods, removed, stats.means).items():
        m = mods[name]
        base = shift if m.bias is None else m.bias.detach().double().cpu() + shift
        out[name] = base.to(device=m.weight.device, dtype=m.weight.dtype)
    return out


def _note_holder_sizes(rows: List[LayerChange], sizes: Dict[str, Dict[str, str]], mods) -> None:
    """Size attributes of a module without a weight of its own (an attention's num_heads) in
    the note of the first row (by name) of a layer inside it, which the Report and ts.summary
    list."""
    for holder, changed in sorted(sizes.items()):
        if holder not in mods or float_weight(mods[holder]) is not None:
            continue
        prefix = f"{holder}." if holder else ""
        row = next((r for r in rows if r.name.startswith(prefix) and r.action == "pruned"), None)
        if row is not None:
            text = ", ".join(f"{a} {v}" for a, v in sorted(changed.items()))
            row.reason = "; ".join(t for t in (row.reason, f"'{holder}': {text}") if t)


def _partly_kept(report: Report) -> Report:
    """A layer pruned through one space (the output layer's inputs) but whose own space was
    skipped (its outputs, coupled with the model output) is one pruned row, the skip its note."""
    pruned = {c.name: c for c in report.changed}
    kept = []
    for c in report.changes:
        if c.action == "skipped" and c.name in pruned:
            row = pruned[c.name]
            row.reason = "; ".join(r for r in (row.reason, f"kept {c.reason}") if r)
        else:
            kept.append(c)
    report.changes = kept
    return report


def summary_rows(model: nn.Module) -> List[LayerChange]:
    """ts.summary's rows for structurally pruned layers: their sizes before (known in the
    process that pruned them; a loaded model shows its pruned size twice) and now."""
    record = getattr(model, STRUCTURED_ATTR, None) or {}
    unpruned = getattr(model, UNPRUNED_BYTES_ATTR, None) or {}
    mods = dict(model.named_modules())
    experts = expert_neurons.fused_experts(model) if record else {}
    rows = []
    for name in sorted(record):
        m = mods.get(name)
        if m is None or masks.is_masked(m) or (float_weight(m) is None and name not in experts):
            continue
        attrs = ", ".join(f"{a}={v}" for a, v in sorted(record[name].items()))
        rows.append(LayerChange(name, type(m).__name__, "pruned", "channels removed",
                                unpruned.get(name, module_bytes(m)), module_bytes(m), reason=attrs))
    _note_holder_sizes(rows, {n: {a: str(v) for a, v in attrs.items()} for n, attrs in record.items() if attrs},
                       mods)
    return rows
