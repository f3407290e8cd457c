"""Heads of torch's nn.MultiheadAttention as channel spaces, for ts.ChannelPrune.

torch's class keeps q / k / v packed and derives head_dim from embed_dim / num_heads, so it
cannot hold fewer heads than its width. ChannelPrune unpacks each one into a
ProjectedMultiheadAttention (nn/projected_attention.py, q_proj / k_proj / v_proj / out_proj as
nn.Linear layers); a head there is head_dim rows of q_proj, k_proj and v_proj (and of bias_k /
bias_v) and head_dim columns of out_proj, with num_heads updated; embed_dim, the width of its
inputs and output, stays. Attentions whose heads all stay are packed again afterwards.
"""
from typing import Dict

from torch import nn

from ..nn.int8_conv_chain import has_hooks
from ..nn.projected_attention import ProjectedMultiheadAttention
from .channel_space import Slice, Spaces

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def add_head_spaces(sp: Spaces, model: nn.Module, unpack_hint: str) -> None:
    """One "heads" space per attention; a packed one (left packed: hooks, or a soft-masking
    Schedule that must keep the optimizer's parameters) is reported as kept, `unpack_hint` why."""
    from .channel_rules import _linear_space  # channel_rules imports this module

    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, ProjectedMultiheadAttention):
            hd = m.head_dim
            sid = _linear_space(sp, "heads", m.num_heads, [(p + q, getattr(m, q), hd) for q in PROJECTIONS],
                                [(p + "out_proj", m.out_proj, hd)])
            s = sp.get(sid)
            if s.frozen:  # a compressed projection: nothing sliced
                continue
            s.slices += [Slice(name, b, 2, 0, hd) for b in ("bias_k", "bias_v") if getattr(m, b) is not None]
            s.attrs.append((name, "num_heads", 1))
        elif isinstance(m, nn.MultiheadAttention):
            sid = sp.new(m.num_heads, "heads")
            s = sp.get(sid)
            s.producers.append(name)
            why = ("forward hooks, which an unpacked copy would lose" if has_hooks(m) else
                   "a subclass of it" if type(m) is not nn.MultiheadAttention else unpack_hint)
            s.frozen.append(f"packed q/k/v of nn.MultiheadAttention '{name}' ({why})")


def projection_owners(model: nn.Module) -> Dict[str, str]:
    """{name of a projection inside an unpacked attention: the attention's name}; the channel
    graph keeps these whole (their heads are the attention's own space)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ProjectedMultiheadAttention):
            p = f"{name}." if name else ""
            for proj in (*PROJECTIONS, "out_proj"):
                out[p + proj] = name
    return out
