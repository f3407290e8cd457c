"""Channel spaces of transformer blocks, from their module structure (Hugging Face BERT,
LLaMA-style and GPT-2 models, torch's nn.TransformerEncoderLayer / DecoderLayer: the residual
stream stays whole, so FFN neurons and attention heads are the block-internal channels there
is to remove).

  FFN neurons: BERT intermediate.dense rows -> output.dense columns;
               LLaMA gate_proj / up_proj rows -> down_proj columns.
  Heads:       BERT query / key / value rows (head_size each) -> attention.output.dense
               columns, with num_attention_heads / all_head_size updated;
               LLaMA (GQA): a unit is one kv head with its num_key_value_groups query heads:
               k_proj / v_proj rows (head_dim), q_proj rows and o_proj columns
               (groups x head_dim); shapes carry the head counts (view(..., -1, head_dim)).
  GPT-2 (transformers' Conv1D, weight [in, out]: an output feature is a weight COLUMN):
               FFN neurons: mlp.c_fc columns -> mlp.c_proj rows;
               heads: attn.c_attn packs q | k | v, split_size columns each, so a head is
               head_dim columns at the same place in each third, and head_dim rows of
               attn.c_proj, with num_heads / split_size updated.
  torch:       FFN neurons: linear1 rows -> linear2 columns; heads of its attentions
               (attention_heads.py, for every nn.MultiheadAttention of any model).
"""
from typing import List, Tuple

from torch import nn

from ..conv1d import is_conv1d
from .attention_heads import head_sized_parameter
from .channel_graph import PASS_FUNCTIONS, PASS_MODULES
from .channel_space import Slice, Spaces, linear_space


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def find_blocks(model: nn.Module) -> List[str]:
    """Names of the transformer blocks these rules handle (empty: not a transformer)."""
    out = []
    for name, m in model.named_modules():
        if _is_bert_layer(m) or _is_llama_layer(m) or _is_gpt2_block(m):
            out.append(name)
    return out


def _is_bert_layer(m) -> bool:
    att = getattr(getattr(m, "attention", None), "self", None)
    return (att is not None and hasattr(att, "attention_head_size") and hasattr(m, "intermediate")
            and hasattr(getattr(m, "output", None), "dense"))


# a head's rows in each: BERT's, DeBERTa-v2 / v3's (with its position projections where
# share_att_key is off; its code views every one as (num_attention_heads, -1))
BERT_QKV = (("query", "key", "value"), ("query_proj", "key_proj", "value_proj"))
DEBERTA_POSITION = ("pos_key_proj", "pos_query_proj")


def _bert_head_projections(attention) -> Tuple[str, ...]:
    """The linears of a BERT-style layer's self-attention whose rows are its heads, where
    output.dense is a linear and the sizes agree, else (): DeBERTa v1's packed in_proj, for
    one, is not matched (its heads stay)."""
    att = attention.self
    hs, heads = getattr(att, "attention_head_size", None), getattr(att, "num_attention_heads", None)
    o = getattr(getattr(attention, "output", None), "dense", None)
    if type(hs) is not int or type(heads) is not int or not isinstance(o, nn.Linear) or o.in_features != hs * heads:
        return ()
    for qkv in BERT_QKV:
        names = qkv + tuple(n for n in DEBERTA_POSITION if qkv[0] == "query_proj" and hasattr(att, n))
        if all(isinstance(getattr(att, n, None), nn.Linear) and getattr(att, n).out_features == hs * heads
               for n in names):
            return names
    return ()


def _is_llama_layer(m) -> bool:
    att, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    return (att is not None and mlp is not None and hasattr(att, "q_proj") and hasattr(att, "head_dim")
            and isinstance(getattr(att, "num_key_value_groups", None), int) and hasattr(mlp, "gate_proj"))


def _is_gpt2_block(m) -> bool:
    att, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (att is not None and mlp is not None
            and all(is_conv1d(getattr(x, n, None)) for x, n in ((att, "c_attn"), (att, "c_proj"),
                                                                 (mlp, "c_fc"), (mlp, "c_proj"))))


def _is_torch_layer(m) -> bool:
    """torch's layer computing its own feed-forward (a subclass overriding forward / _ff_block,
    a GLU with a doubled linear1, may route the neurons otherwise)."""
    base = next((c for c in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer) if isinstance(m, c)), None)
    return (base is not None and type(m).forward is base.forward and type(m)._ff_block is base._ff_block
            and isinstance(getattr(m, "linear1", None), nn.Linear) and isinstance(getattr(m, "linear2", None), nn.Linear)
            and m.linear1.out_features == m.linear2.in_features)


def _gpt2_layout_problem(att) -> str:
    """Why att's packed q | k | v is not the GPT-2 layout the head rule knows, or ""."""
    n, hd, split = (getattr(att, a, None) for a in ("num_heads", "head_dim", "split_size"))
    if not all(isinstance(v, int) and v > 0 for v in (n, hd, split)):
        return "an attention without int num_heads / head_dim / split_size"
    if getattr(att, "is_cross_attention", False) or hasattr(att, "q_attn"):
        return "a cross-attention (keys and values from the encoder)"
    if n * hd != split or att.c_attn.nf != 3 * split or att.c_proj.nx != split:
        return (f"a q | k | v packing other than 3 x num_heads x head_dim (num_heads {n}, head_dim {hd}, "
                f"split_size {split}, c_attn {att.c_attn.nf} wide)")
    return ""


def _gpt2_heads(sp: Spaces, name: str, att) -> None:
    problem = _gpt2_layout_problem(att)
    n = att.num_heads if not problem else 1
    sid = sp.new(n, "heads")
    s = sp.get(sid)
    s.producers.append(f"{name}.c_attn")
    if problem:  # reported as skipped, never pruned by guess
        s.frozen.append(f"packed q/k/v of '{name}', {problem}")
        return
    hd, split = att.head_dim, att.split_size
    for offset in (0, split, 2 * split):  # the head's columns in q, in k and in v
        s.slices.append(Slice(f"{name}.c_attn", "weight", 1, offset, hd))
        s.slices.append(Slice(f"{name}.c_attn", "bias", 0, offset, hd))
    s.slices.append(Slice(f"{name}.c_proj", "weight", 0, 0, hd))
    s.attrs += [(f"{name}.c_attn", "nf", 3 * hd), (f"{name}.c_proj", "nx", hd),
                (name, "num_heads", 1), (name, "split_size", hd)]


def build_spaces(model: nn.Module, heads: bool = True) -> Spaces:
    sp = Spaces()
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if _is_bert_layer(m):
            inter, out = m.intermediate.dense, m.output.dense
            linear_space(sp, "neurons", inter.out_features, [(p + "intermediate.dense", inter, 1)],
                          [(p + "output.dense", out, 1)])
            projections = _bert_head_projections(m.attention) if heads else None
            if projections:
                att, o = m.attention.self, m.attention.output.dense
                hs = att.attention_head_size
                sid = linear_space(sp, "heads", att.num_attention_heads,
                                    [(p + f"attention.self.{q}", getattr(att, q), hs) for q in projections],
                                    [(p + "attention.output.dense", o, hs)])
                sp.get(sid).attrs += [(p + "attention.self", "num_attention_heads", 1),
                                      (p + "attention.self", "all_head_size", hs)]
        elif _is_llama_layer(m):
            mlp, att = m.mlp, m.self_attn
            linear_space(sp, "neurons", mlp.gate_proj.out_features,
                          [(p + "mlp.gate_proj", mlp.gate_proj, 1), (p + "mlp.up_proj", mlp.up_proj, 1)],
                          [(p + "mlp.down_proj", mlp.down_proj, 1)])
            if heads:
                hd, groups = att.head_dim, att.num_key_value_groups
                n_kv = att.k_proj.out_features // hd
                sid = linear_space(sp, "heads", n_kv,
                                    [(p + "self_attn.q_proj", att.q_proj, groups * hd),
                                     (p + "self_attn.k_proj", att.k_proj, hd),
                                     (p + "self_attn.v_proj", att.v_proj, hd)],
                                    [(p + "self_attn.o_proj", att.o_proj, groups * hd)])
                s = sp.get(sid)
                for attr, per in (("num_heads", groups), ("num_key_value_heads", 1)):
                    if isinstance(getattr(att, attr, None), int):
                        s.attrs.append((p + "self_attn", attr, per))
                spanning = head_sized_parameter(att, hd, [n_kv * groups, n_kv], LLAMA_PROJECTIONS)
                if spanning is not None:  # OLMo-2's / Cohere's q_norm over all heads: removing one changes the rest
                    s.frozen.append(f"'{p}self_attn.{spanning}' spans the heads (the rule slices q/k/v/o only)")
        elif _is_gpt2_block(m):
            mlp = m.mlp
            linear_space(sp, "neurons", mlp.c_fc.nf, [(p + "mlp.c_fc", mlp.c_fc, 1)],
                          [(p + "mlp.c_proj", mlp.c_proj, 1)])
            if heads:
                _gpt2_heads(sp, p + "attn", m.attn)
    return sp


def add_torch_layer_spaces(sp: Spaces, model: nn.Module) -> None:
    """FFN neurons of torch's nn.TransformerEncoderLayer / DecoderLayer, whichever route built
    the rest (the traced graph keeps these layers whole; their attentions' heads:
    attention_heads.add_head_spaces)."""
    for name, m in model.named_modules():
        if not _is_torch_layer(m):
            continue
        p = f"{name}." if name else ""
        sid = linear_space(sp, "neurons", m.linear1.out_features, [(p + "linear1", m.linear1, 1)],
                           [(p + "linear2", m.linear2, 1)])
        act = m.activation
        if not (act in PASS_FUNCTIONS or isinstance(act, PASS_MODULES)):  # a GLU halves the neurons
            sp.get(sid).frozen.append(f"activation {getattr(act, '__name__', type(act).__name__)} of "
                                      f"'{name}', not known to act neuron by neuron")
