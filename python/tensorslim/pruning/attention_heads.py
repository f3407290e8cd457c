"""Attention heads as channel spaces, for ts.ChannelPrune, in models no block rule covers.

torch's nn.MultiheadAttention keeps q / k / v packed and derives head_dim from embed_dim /
num_heads, so it cannot hold fewer heads than its width. ChannelPrune unpacks each one into a
ProjectedMultiheadAttention (nn/projected_attention.py, q_proj / k_proj / v_proj / out_proj as
nn.Linear layers); a head is head_dim rows of q_proj, k_proj and v_proj (and of bias_k /
bias_v) and head_dim columns of out_proj, with num_heads updated; embed_dim, the width of its
inputs and output, stays. Attentions whose heads all stay are packed again afterwards.

Hugging Face attentions (hf_layout) lose heads in place, their code viewing the projections as
(-1 or num_heads, head_dim), so only the count attribute changes:
  - q_proj / k_proj / v_proj and out_proj, o_proj or dense, an int head_dim (transformers 5's
    ViT, CLIP, SigLIP, Whisper, BART, OPT, StarCoder2, Phi); grouped-query with an int
    num_key_value_groups: a unit is one kv head with its query heads; the same with
    attention_head_size for DistilBERT's q_lin / k_lin / v_lin / out_lin, MPNet's q / k / v / o
    and ALBERT's query / key / value / dense (BERT's own keeps dense outside: a block rule's)
    (all_head_size updated where kept, embed_dim where it is the heads' width: XGLM's output
    reshape reads it);
  - MPNet's position bias: one column per head of its encoder's relative_attention_bias, added
    in every layer, so all the attentions under that table lose the same heads (as T5's below);
  - GPT-NeoX's fused query_key_value: 3 x head_size consecutive rows per head; Falcon's three
    layouts of it (grouped, multi-query, per head); GPT-BigCode's c_attn (multi-query or per
    head); ModernBERT's Wqkv (q | k | v blocks): head_dim rows in each block, Wo's columns;
    Phi-3's qkv_proj (q | k | v blocks under grouped-query, its query count read from the
    shared config: config.num_attention_heads in size_attrs);
  - T5's q / k / v / o (n_heads, key_value_proj_dim): every attention of one stack and kind
    loses the same heads, since the stack's first block computes the position bias (one
    column of relative_attention_bias per head) that every later block adds.
The check against the original catches code that sizes heads otherwise; they then stay.
"""
import contextlib
import dataclasses
import fnmatch
import re
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

from torch import nn

from ..nn.int8_conv_chain import has_hooks
from ..nn.projected_attention import ProjectedMultiheadAttention
from .channel_space import Slice, Spaces, linear_space

QKV = ("q_proj", "k_proj", "v_proj")
# the separate-projection attentions: (q / k / v, output projections, head-size attribute)
PROJECTED = ((QKV, ("out_proj", "o_proj", "dense"), "head_dim"),
             (("q_lin", "k_lin", "v_lin"), ("out_lin",), "attention_head_size"),  # DistilBERT
             (("q", "k", "v"), ("o",), "attention_head_size"),                    # MPNet
             (("query", "key", "value"), ("dense",), "attention_head_size"))      # ALBERT
# torch modules that read and write their width whole (the traced graph keeps it): their
# insides are pruned by rules of their own (heads here, FFN neurons in channel_rules)
ATTENTIONS = (nn.MultiheadAttention, ProjectedMultiheadAttention)
TORCH_BLOCKS = ATTENTIONS + (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                             nn.TransformerDecoder, nn.Transformer)
COUNTS = ("num_heads", "num_attention_heads", "n_heads")
T5_QKVO = ("q", "k", "v", "o")


class Layout(NamedTuple):
    units: int                          # heads; kv heads (each with its query heads) under GQA
    head_dim: int
    qkv: Tuple[str, ...]                # the projections producing the heads (one where fused)
    rows: Tuple[int, ...]               # each one's consecutive output rows per unit
    out: str                            # the output projection's attribute
    attrs: Tuple[Tuple[str, int], ...]  # (size attribute, its size per unit)
    shared_bias: bool = False           # T5: one position bias per stack (see add_head_spaces)
    groups: int = 1                     # query heads per unit (num_key_value_groups)
    # the fused projection's later blocks (its k and v): (first row, rows per unit) of each
    blocks: Tuple[Tuple[int, int], ...] = ()


def hf_layout(m: nn.Module) -> Optional[Layout]:
    """The heads of a Hugging Face style attention (see the module doc), or None: another
    module, a packed attention, or sizes that disagree."""
    if isinstance(m, ATTENTIONS):
        return None
    if all(isinstance(getattr(m, q, None), nn.Module) for q in T5_QKVO) and hasattr(m, "has_relative_attention_bias"):
        hd, heads = getattr(m, "key_value_proj_dim", None), getattr(m, "n_heads", None)
        if type(heads) is not int or type(hd) is not int or hd <= 0 or type(getattr(m, "inner_dim", None)) is not int:
            return None
        width = heads * hd
        if any(getattr(getattr(m, q), "out_features", None) != width for q in T5_QKVO[:3]) or \
                getattr(m.o, "in_features", None) != width:
            return None
        return Layout(heads, hd, T5_QKVO[:3], (hd,) * 3, "o", (("n_heads", 1), ("inner_dim", hd)), shared_bias=True)
    if isinstance(getattr(m, "query_key_value", None), nn.Module) and isinstance(getattr(m, "dense", None), nn.Module):
        return _fused_layout(m)
    if isinstance(getattr(m, "Wqkv", None), nn.Module) and isinstance(getattr(m, "Wo", None), nn.Module):
        return _blocked_layout(m)
    if isinstance(getattr(m, "qkv_proj", None), nn.Linear) and isinstance(getattr(m, "o_proj", None), nn.Linear):
        return _qkv_proj_layout(m)
    if isinstance(getattr(m, "c_attn", None), nn.Linear) and isinstance(getattr(m, "c_proj", None), nn.Linear) \
            and hasattr(m, "multi_query"):
        return _bigcode_layout(m)
    for qkv, outputs, size in PROJECTED:
        if all(isinstance(getattr(m, q, None), nn.Module) for q in qkv):
            return _projected_layout(m, qkv, outputs, size)
    return None


def _fused_layout(m: nn.Module) -> Optional[Layout]:
    """GPT-NeoX (Pythia): query_key_value viewed as (-1 heads, 3 x head_size), so a head is 3 x
    head_size consecutive rows of it (its q, k and v) and head_size columns of dense; no head
    count is kept. Falcon: _falcon_layout. Bloom (ALiBi) is not matched."""
    if all(hasattr(m, a) for a in ("num_heads", "num_kv_heads", "new_decoder_architecture", "multi_query")):
        return _falcon_layout(m)
    hs = getattr(m, "head_size", None)
    width = getattr(m.dense, "in_features", None)
    if type(hs) is not int or hs <= 0 or type(width) is not int or width % hs or hasattr(m, "num_heads") \
            or getattr(m.query_key_value, "out_features", None) != 3 * width:
        return None
    return Layout(width // hs, hs, ("query_key_value",), (3 * hs,), "dense", ())


def _falcon_layout(m: nn.Module) -> Optional[Layout]:
    """Falcon's query_key_value, viewed by its three layouts: grouped (new_decoder_architecture,
    40B / 180B: per kv head its query heads, its key and its value, consecutive: a unit is the
    group), multi-query (7B: all query heads, then one key and one value: a unit is a query
    head, the key and value stay) and per head (q, k, v consecutive). ALiBi models (slopes by
    the model's head count and index) are not matched."""
    heads, kv, hd = m.num_heads, m.num_kv_heads, getattr(m, "head_dim", None)
    groups = getattr(m, "num_key_value_groups", None)
    if any(type(v) is not int or v <= 0 for v in (heads, kv, hd, groups)) or heads != kv * groups or \
            getattr(getattr(m, "config", None), "alibi", True) or getattr(m.dense, "in_features", None) != heads * hd:
        return None
    width = getattr(m.query_key_value, "out_features", None)
    if m.new_decoder_architecture:
        if width != (heads + 2 * kv) * hd:
            return None
        attrs = (("num_heads", groups), ("num_kv_heads", 1))
        return Layout(kv, hd, ("query_key_value",), ((groups + 2) * hd,), "dense", attrs, groups=groups)
    if m.multi_query:
        if kv != 1 or width != (heads + 2) * hd:
            return None
        return Layout(heads, hd, ("query_key_value",), (hd,), "dense", (("num_heads", 1), ("num_key_value_groups", 1)))
    if kv != heads or width != 3 * heads * hd:
        return None
    return Layout(heads, hd, ("query_key_value",), (3 * hd,), "dense", (("num_heads", 1), ("num_kv_heads", 1)))


def _bigcode_layout(m: nn.Module) -> Optional[Layout]:
    """GPT-BigCode (StarCoder, SantaCoder): c_attn (an nn.Linear, unlike GPT-2's Conv1D) holds
    every query head, then one key and one value (multi_query: a unit is a query head, split by
    embed_dim, which shrinks with it), or per head q, k, v consecutive (viewed as (num_heads,
    3 x head_dim)). Cross-attentions are not matched."""
    heads, hd = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if type(heads) is not int or type(hd) is not int or heads <= 0 or hd <= 0 or getattr(m, "is_cross_attention", True) \
            or getattr(m, "embed_dim", None) != heads * hd or m.c_proj.in_features != heads * hd:
        return None
    if m.multi_query:
        if getattr(m, "kv_dim", None) != hd or m.c_attn.out_features != (heads + 2) * hd:
            return None
        attrs = (("num_heads", 1), ("embed_dim", hd), ("num_key_value_groups", 1))
        return Layout(heads, hd, ("c_attn",), (hd,), "c_proj", attrs)
    if m.c_attn.out_features != 3 * heads * hd or getattr(m, "kv_heads", None) != heads:
        return None
    return Layout(heads, hd, ("c_attn",), (3 * hd,), "c_proj", (("num_heads", 1), ("kv_heads", 1), ("kv_dim", hd)))


def _blocked_layout(m: nn.Module) -> Optional[Layout]:
    """ModernBERT: Wqkv viewed as (3, -1 heads, head_dim), so a head is head_dim rows in each of
    its q, k and v blocks, and head_dim columns of Wo; no head count is kept."""
    hd, width = getattr(m, "head_dim", None), getattr(m.Wo, "in_features", None)
    if type(hd) is not int or hd <= 0 or type(width) is not int or width % hd or hasattr(m, "num_heads") \
            or getattr(m.Wqkv, "out_features", None) != 3 * width:
        return None
    return Layout(width // hd, hd, ("Wqkv",), (hd,), "Wo", (), blocks=((width, hd), (2 * width, hd)))


def _qkv_proj_layout(m: nn.Module) -> Optional[Layout]:
    """Phi-3 (Phi-3.5, Phi-4-mini): qkv_proj holds every query head, then the kv heads' keys,
    then their values; a unit is a kv head with its query heads (num_key_value_groups of them:
    head_dim rows each in the q block, head_dim rows in the k and v blocks). The layer slices
    qkv_proj at `self.config.num_attention_heads`, a count every layer shares: each pruned
    attention gets its own (size_attrs.ConfigView)."""
    hd, kv, groups = (getattr(m, a, None) for a in ("head_dim", "num_key_value_heads", "num_key_value_groups"))
    heads = getattr(getattr(m, "config", None), "num_attention_heads", None)
    if any(type(v) is not int or v <= 0 for v in (hd, kv, groups, heads)) or heads != kv * groups or \
            m.qkv_proj.out_features != (heads + 2 * kv) * hd or m.o_proj.in_features != heads * hd:
        return None
    attrs = (("num_key_value_heads", 1), ("config.num_attention_heads", groups))
    return Layout(kv, hd, ("qkv_proj",), (groups * hd,), "o_proj", attrs, groups=groups,
                  blocks=((heads * hd, hd), ((heads + kv) * hd, hd)))


def _projected_layout(m: nn.Module, qkv: Tuple[str, ...], outputs: Tuple[str, ...], size: str) -> Optional[Layout]:
    """q / k / v projections `qkv`, one of `outputs`, an int head size `size`; the head count
    from q's width (agreeing with num_heads / num_attention_heads / n_heads where the module
    keeps one); fewer k / v heads (grouped-query) with an int num_key_value_groups: a unit is one
    kv head with its group of query heads (their code repeats each kv head that many times)."""
    out = next((o for o in outputs if isinstance(getattr(m, o, None), nn.Module)), None)
    hd = getattr(m, size, None)
    if out is None or type(hd) is not int or hd <= 0:
        return None
    q, k, v = (getattr(getattr(m, n), "out_features", None) for n in qkv)
    if not all(type(w) is int and w > 0 and w % hd == 0 for w in (q, k, v)) or k != v or \
            getattr(getattr(m, out), "in_features", None) != q:
        return None
    heads, kv = q // hd, k // hd
    count = next((c for c in COUNTS if type(getattr(m, c, None)) is int), None)
    if count is not None and getattr(m, count) != heads:
        return None
    groups = heads // kv
    if heads != kv and (heads % kv or getattr(m, "num_key_value_groups", None) != groups):
        return None
    attrs = ((count, groups),) if count is not None else ()
    if heads != kv and type(getattr(m, "num_key_value_heads", None)) is int:
        attrs += (("num_key_value_heads", 1),)
    if getattr(m, "all_head_size", None) == q:  # MPNet's output view reads it
        attrs += (("all_head_size", groups * hd),)
    if type(getattr(m, "embed_dim", None)) is int and m.embed_dim == q:  # XGLM's output reshape reads it
        attrs += (("embed_dim", groups * hd),)
    return Layout(kv, hd, qkv, (groups * hd, hd, hd), out, attrs, groups=groups)


def _sinks(att: nn.Module, query_heads: int) -> bool:
    """Whether the attention holds one learned sink logit per query head (GPT-OSS's `sinks`,
    a softmax column of its own per head), which pruning slices with the heads."""
    sinks = att._parameters.get("sinks")
    return isinstance(sinks, nn.Parameter) and sinks.dim() == 1 and sinks.numel() == query_heads


def head_sized_parameter(att: nn.Module, hd: int, counts: Sequence[int], own: Sequence[str],
                         stream: Optional[int] = None) -> Optional[str]:
    """The first parameter or buffer of an attention, outside its projections `own`, with a
    dimension sized by the heads (a q_norm over num_heads x head_dim, attention sinks, ALiBi
    slopes: one per head), or None. counts: the head counts (query heads, and kv heads where
    they differ). stream: the width of the attention's output; an nn.LayerNorm over it
    (ALBERT's, on the residual sum after its output projection) normalizes the stream, not the
    heads, even where heads x head_dim equals it (the check against the original catches a
    model where it does not)."""
    sizes = {n * hd for n in counts} | set(counts)
    sizes.discard(hd)
    stream_norms = {n for n, m in att.named_modules()
                    if isinstance(m, nn.LayerNorm) and stream is not None and tuple(m.normalized_shape) == (stream,)}
    # float buffers only: a boolean causal mask (GPT-Neo's `bias`, max_positions square) has
    # nothing per head, whatever its size
    held = [*att.named_parameters(), *((n, b) for n, b in att.named_buffers() if b.is_floating_point())]
    for name, t in held:
        if name.split(".")[0] not in own and name.rpartition(".")[0] not in stream_norms and \
                any(d in sizes for d in t.shape):
            return name
    return None


def add_head_spaces(sp: Spaces, model: nn.Module, exclude=(), packed_hint=None, kept_hint=None) -> None:
    """One "heads" space per attention, kept whole (a Report row says why) where it holds one
    head, is held under several names, was called with a per-head mask or had its attention
    weights used (sp.keep_heads, from the trace), or matches an `exclude` pattern by its own
    name; a packed one (hooks, a subclass, or a Schedule's soft masks: `packed_hint`) too; every
    one with `kept_hint` (the model failed the check with its heads removed). Hugging Face
    attentions that a block rule already covers are left to it."""
    names: Dict[int, list] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    covered = {p for s in sp.roots().values() for p in s.producers}
    stacks: Dict[str, int] = {}  # T5: the space every attention of one stack and kind joins
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        hf = hf_layout(m)
        if hf is not None and p + hf.qkv[0] in covered:
            continue
        if not isinstance(m, ATTENTIONS) and hf is None:
            continue
        if hf is None:  # torch's attention (unpacked)
            hf = Layout(m.num_heads, m.head_dim, QKV, (m.head_dim,) * 3, "out_proj", (("num_heads", 1),))
            torch_attention = True
        else:
            torch_attention = False
        heads, hd, qkv, out, groups = hf.units, hf.head_dim, hf.qkv, hf.out, hf.groups
        owner = None if torch_attention or hf.shared_bias or groups != 1 else _bias_table_owner(model, name, heads)
        why = _kept_whole(name, m, heads * groups, len(names[id(m)]), sp, exclude, packed_hint,
                          None if torch_attention else kept_hint)
        sinks = _sinks(m, heads * groups) if not torch_attention else None
        if why is None and not torch_attention:
            own = (*qkv, out, "relative_attention_bias") + (("sinks",) if sinks else ())
            spanning = head_sized_parameter(m, hd, sorted({heads, heads * groups}), own,
                                            getattr(getattr(m, out), "out_features", None))
            why = None if spanning is None else f"attention '{name}': '{spanning}' spans the heads"
        if why is None and heads == 1:
            why = f"attention '{name}', a single kv head (its {groups} query heads share it)"
        if why is not None:
            sid = sp.new(heads, "heads")
            s = sp.get(sid)
            s.producers.append(name)
            s.frozen.append(why)
        else:
            sid = linear_space(sp, "heads", heads, [(p + q, getattr(m, q), r) for q, r in zip(qkv, hf.rows)],
                               [(p + out, getattr(m, out), groups * hd)])
            s = sp.get(sid)
            if hf.blocks and not s.frozen:  # the unit's rows in each later block of the fused projection
                fused, per_unit = p + qkv[0], hf.rows[0] + sum(rows for _, rows in hf.blocks)
                s.slices += [dataclasses.replace(sl, offset=first, rep=rows) for sl in s.slices if sl.module == fused
                             for first, rows in hf.blocks]
                s.attrs = [(n, a, per_unit if n == fused else per) for n, a, per in s.attrs]
            if not s.frozen:  # (frozen: a compressed projection, nothing sliced)
                s.attrs += [(name, attr, per) for attr, per in hf.attrs]
                if sinks:  # a unit's query heads are consecutive: its `groups` sinks go with it
                    s.slices.append(Slice(name, "sinks", 0, 0, groups))
                if torch_attention:
                    s.slices += [Slice(name, b, 2, 0, hd) for b in ("bias_k", "bias_v") if getattr(m, b) is not None]
                if hf.shared_bias and getattr(m, "has_relative_attention_bias", False):
                    s.slices.append(Slice(p + "relative_attention_bias", "weight", 1))
                    s.attrs.append((p + "relative_attention_bias", "embedding_dim", 1))
                if owner is not None and owner not in stacks:  # the table once per space
                    o = f"{owner}." if owner else ""
                    s.slices.append(Slice(o + "relative_attention_bias", "weight", 1))
                    s.attrs.append((o + "relative_attention_bias", "embedding_dim", 1))
                    if getattr(model.get_submodule(owner), "n_heads", None) == heads:
                        s.attrs.append((owner, "n_heads", 1))
        if owner is not None:  # MPNet: the attentions under one table lose the same heads
            stacks[owner] = sp.union(stacks[owner], sid, f"attention '{name}'") if owner in stacks else sid
        if hf.shared_bias:
            # T5 computes its position bias (one column per head) in a stack's first block and adds
            # it in every later one, cross-attentions a zero bias of the first one's head count:
            # all attentions of one stack and kind lose the same heads
            stack = "T5 " + re.sub(r"(^|\.)block\.\d+\.", r"\1block.*.", name)
            stacks[stack] = sp.union(stacks[stack], sid, f"attention '{name}'") if stack in stacks else sid


def _bias_table_owner(model: nn.Module, name: str, heads: int) -> Optional[str]:
    """The nearest module above attention `name` holding a relative_attention_bias table with
    one column per head, which it computes once and hands to every layer (MPNet's encoder), or
    None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:i])
        table = getattr(model.get_submodule(owner), "relative_attention_bias", None)
        if isinstance(table, nn.Embedding) and table.embedding_dim == heads:
            return owner
    return None


def _kept_whole(name: str, m: nn.Module, heads: int, n_names: int, sp: Spaces, exclude, packed_hint, kept_hint):
    what = f"attention '{name}'"
    pattern = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if pattern is not None:
        return f"{what}, excluded by pattern {pattern!r}"
    if kept_hint is not None:
        return f"{what}, {kept_hint}"
    if n_names > 1:
        return f"{what}, held under {n_names} names (each call's heads would come off one module)"
    if heads == 1:
        return f"{what}, a single head"
    if name in sp.keep_heads:
        return f"{what}, {sp.keep_heads[name]}"
    if not isinstance(m, nn.MultiheadAttention):  # ProjectedMultiheadAttention, Hugging Face's
        return None
    why = ("forward hooks, which an unpacked copy would lose" if has_hooks(m) else
           "a subclass of it" if type(m) is not nn.MultiheadAttention else packed_hint or "left packed")
    return f"packed q/k/v of nn.MultiheadAttention '{name}' ({why})"


def block_owners(model: nn.Module) -> Dict[str, str]:
    """{module inside a torch block (TORCH_BLOCKS) or a Hugging Face attention (hf_layout): the
    outermost such block}; the channel graph keeps their inputs and outputs whole (the autograd
    graph shows their layers one by one; their heads are spaces of their own)."""
    out: Dict[str, str] = {}
    for name, m in model.named_modules():
        if not (isinstance(m, TORCH_BLOCKS) or hf_layout(m) is not None) or name in out:  # inside one
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
