"""Channel spaces of transformer blocks, from their module structure (Hugging Face BERT and
LLaMA-style models: the residual stream stays whole, so FFN neurons and attention heads are
the block-internal channels there is to remove).

  FFN neurons: BERT intermediate.dense rows -> output.dense columns;
               LLaMA gate_proj / up_proj rows -> down_proj columns.
  Heads:       BERT query / key / value rows (head_size each) -> attention.output.dense
               columns, with num_attention_heads / all_head_size updated;
               LLaMA (GQA): a unit is one kv head with its num_key_value_groups query heads:
               k_proj / v_proj rows (head_dim), q_proj rows and o_proj columns
               (groups x head_dim); shapes carry the head counts (view(..., -1, head_dim)).
"""
from typing import List

from torch import nn

from .channel_space import Slice, Spaces


def _params(m: nn.Linear) -> List[str]:
    return ["weight"] + (["bias"] if m.bias is not None else [])


def _linear_space(sp: Spaces, kind: str, size: int, producers, consumers, rep_in: int = 1,
                  rep_out=None) -> int:
    """producers: [(name, module, rep)], consumers: [(name, module, rep)]."""
    sid = sp.new(size, kind)
    s = sp.get(sid)
    for name, m, rep in producers:
        s.producers.append(name)
        s.slices += [Slice(name, p, 0, 0, rep) for p in _params(m)]
        s.attrs.append((name, "out_features", rep))
    for name, m, rep in consumers:
        s.slices.append(Slice(name, "weight", 1, 0, rep))
        s.attrs.append((name, "in_features", rep))
    return sid


def find_blocks(model: nn.Module) -> List[str]:
    """Names of the transformer blocks these rules handle (empty: not a transformer)."""
    out = []
    for name, m in model.named_modules():
        if _is_bert_layer(m) or _is_llama_layer(m):
            out.append(name)
    return out


def _is_bert_layer(m) -> bool:
    att = getattr(getattr(m, "attention", None), "self", None)
    return (att is not None and hasattr(att, "attention_head_size") and hasattr(m, "intermediate")
            and hasattr(getattr(m, "output", None), "dense"))


def _is_llama_layer(m) -> bool:
    att, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    return (att is not None and mlp is not None and hasattr(att, "q_proj") and hasattr(att, "head_dim")
            and hasattr(mlp, "gate_proj"))


def build_spaces(model: nn.Module, heads: bool = True) -> Spaces:
    sp = Spaces()
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if _is_bert_layer(m):
            inter, out = m.intermediate.dense, m.output.dense
            _linear_space(sp, "neurons", inter.out_features, [(p + "intermediate.dense", inter, 1)],
                          [(p + "output.dense", out, 1)])
            if heads:
                att, o = m.attention.self, m.attention.output.dense
                hs = att.attention_head_size
                sid = _linear_space(sp, "heads", att.num_attention_heads,
                                    [(p + f"attention.self.{q}", getattr(att, q), hs) for q in ("query", "key", "value")],
                                    [(p + "attention.output.dense", o, hs)])
                sp.get(sid).attrs += [(p + "attention.self", "num_attention_heads", 1),
                                      (p + "attention.self", "all_head_size", hs)]
        elif _is_llama_layer(m):
            mlp, att = m.mlp, m.self_attn
            _linear_space(sp, "neurons", mlp.gate_proj.out_features,
                          [(p + "mlp.gate_proj", mlp.gate_proj, 1), (p + "mlp.up_proj", mlp.up_proj, 1)],
                          [(p + "mlp.down_proj", mlp.down_proj, 1)])
            if heads:
                hd, groups = att.head_dim, att.num_key_value_groups
                n_kv = att.k_proj.out_features // hd
                sid = _linear_space(sp, "heads", n_kv,
                                    [(p + "self_attn.q_proj", att.q_proj, groups * hd),
                                     (p + "self_attn.k_proj", att.k_proj, hd),
                                     (p + "self_attn.v_proj", att.v_proj, hd)],
                                    [(p + "self_attn.o_proj", att.o_proj, groups * hd)])
                s = sp.get(sid)
                for attr, per in (("num_heads", groups), ("num_key_value_heads", 1)):
                    if isinstance(getattr(att, attr, None), int):
                        s.attrs.append((p + "self_attn", attr, per))
    return sp
