"""Heads of torch's nn.MultiheadAttention as channel spaces, for ts.ChannelPrune.

torch's class keeps q / k / v packed and derives head_dim from embed_dim / num_heads, so it
cannot hold fewer heads than its width. ChannelPrune unpacks each one into a
ProjectedMultiheadAttention (nn/projected_attention.py, q_proj / k_proj / v_proj / out_proj as
nn.Linear layers); a head is head_dim rows of q_proj, k_proj and v_proj (and of bias_k /
bias_v) and head_dim columns of out_proj, with num_heads updated; embed_dim, the width of its
inputs and output, stays. Attentions whose heads all stay are packed again afterwards.
"""
import contextlib
import fnmatch
from typing import Dict, Iterator

from torch import nn

from ..nn.int8_conv_chain import has_hooks
from ..nn.projected_attention import ProjectedMultiheadAttention
from .channel_space import Slice, Spaces, linear_space

QKV = ("q_proj", "k_proj", "v_proj")
# torch modules that read and write their width whole (the traced graph keeps it): their
# insides are pruned by rules of their own (heads here, FFN neurons in channel_rules)
ATTENTIONS = (nn.MultiheadAttention, ProjectedMultiheadAttention)
TORCH_BLOCKS = ATTENTIONS + (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                             nn.TransformerDecoder, nn.Transformer)


def add_head_spaces(sp: Spaces, model: nn.Module, exclude=(), packed_hint=None) -> None:
    """One "heads" space per attention, kept whole (a Report row says why) where it holds one
    head, is held under several names, was called with a per-head mask or had its attention
    weights used (sp.keep_heads, from the trace), or matches an `exclude` pattern by its own
    name; a packed one (hooks, a subclass, or a Schedule's soft masks: `packed_hint`) too."""
    names: Dict[int, list] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    for name, m in model.named_modules():
        if not isinstance(m, ATTENTIONS):
            continue
        why = _kept_whole(name, m, len(names[id(m)]), sp, exclude, packed_hint)
        if why is not None:
            s = sp.get(sp.new(m.num_heads, "heads"))
            s.producers.append(name)
            s.frozen.append(why)
            continue
        p = f"{name}." if name else ""
        hd = m.head_dim
        sid = linear_space(sp, "heads", m.num_heads, [(p + q, getattr(m, q), hd) for q in QKV],
                           [(p + "out_proj", m.out_proj, hd)])
        s = sp.get(sid)
        if s.frozen:  # a compressed projection: nothing sliced
            continue
        s.slices += [Slice(name, b, 2, 0, hd) for b in ("bias_k", "bias_v") if getattr(m, b) is not None]
        s.attrs.append((name, "num_heads", 1))


def _kept_whole(name: str, m: nn.Module, n_names: int, sp: Spaces, exclude, packed_hint):
    what = f"attention '{name}'"
    pattern = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if pattern is not None:
        return f"{what}, excluded by pattern {pattern!r}"
    if n_names > 1:
        return f"{what}, held under {n_names} names (each call's heads would come off one module)"
    if m.num_heads == 1:
        return f"{what}, a single head"
    if name in sp.keep_heads:
        return f"{what}, {sp.keep_heads[name]}"
    if isinstance(m, ProjectedMultiheadAttention):
        return None
    why = ("forward hooks, which an unpacked copy would lose" if has_hooks(m) else
           "a subclass of it" if type(m) is not nn.MultiheadAttention else packed_hint or "left packed")
    return f"packed q/k/v of nn.MultiheadAttention '{name}' ({why})"


def block_owners(model: nn.Module) -> Dict[str, str]:
    """{module inside a torch block (TORCH_BLOCKS): the outermost such block}; the channel graph
    keeps them whole (the autograd graph shows their layers one by one)."""
    out: Dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, TORCH_BLOCKS) or name in out:  # a block inside one already listed
            continue
        p = f"{name}." if name else ""
        for sub, _ in m.named_modules():
            if sub:
                out[p + sub] = name
    return out


@contextlib.contextmanager
def per_head_masks(model: nn.Module, keep: Dict[str, str]) -> Iterator[None]:
    """While the trace runs the example batch: attentions called with a 3-D attn_mask (one per
    batch element and head) go into `keep` (their mask would have to lose the pruned heads)."""
    def hook(name):
        def fn(mod, args, kwargs):
            mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
            if mask is not None and mask.dim() == 3:
                keep[name] = "called with a 3-D (per-head) attn_mask"
        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
               if isinstance(m, ATTENTIONS)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
