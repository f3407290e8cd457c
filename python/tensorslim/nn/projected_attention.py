"""nn.MultiheadAttention with its projections as layers, so techniques can compress them.

torch's nn.MultiheadAttention keeps q / k / v in one packed `in_proj_weight` and hands it and
`out_proj.weight` to F.multi_head_attention_forward, which multiplies by them itself: a
compressed out_proj would never run, and the packed in_proj is no layer at all. Its eval fast
path (and nn.TransformerEncoderLayer's, which reads `linear1.weight` / `linear2.weight` the
same way) would run torch's fp32 kernels on dequantized weights, the "compressed" model no
faster than fp32. ProjectedMultiheadAttention computes the same attention with q_proj, k_proj,
v_proj and out_proj called as ordinary nn.Linear children (ts.quantize / sparsify / factorize /
prepare_qat replace them like any other linear), and with no packed `in_proj_bias`, which makes
nn.TransformerEncoderLayer decline its fused fast path.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _float_mask(mask: Optional[torch.Tensor], name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = may not attend) as an additive float mask, as torch's MHA reads it."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"ProjectedMultiheadAttention: {name} must be bool or floating point, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class ProjectedMultiheadAttention(nn.Module):
    """The attention nn.MultiheadAttention computes (same arguments, outputs and options:
    batch_first, kdim / vdim, bias, add_bias_kv, add_zero_attn, dropout, key_padding_mask,
    attn_mask, need_weights, average_attn_weights, is_causal, unbatched inputs), its four
    projections as nn.Linear children named as in Hugging Face models. head_dim is given where
    ts.ChannelPrune removed heads: q / k / v then give num_heads x head_dim < embed_dim
    features, and a 3-D attn_mask has a slice per remaining head."""

    kind = "projected_mha"

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None,
                 head_dim: Optional[int] = None):
        super().__init__()
        if head_dim is None and (embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads):
            raise ValueError(f"ProjectedMultiheadAttention: embed_dim ({embed_dim}) must be a positive "
                             f"multiple of num_heads ({num_heads})")
        if head_dim is not None and not (embed_dim > 0 and num_heads > 0 and head_dim > 0):
            raise ValueError(f"ProjectedMultiheadAttention: embed_dim ({embed_dim}), num_heads ({num_heads}) "
                             f"and head_dim ({head_dim}) must be positive")
        kw = {"device": device, "dtype": dtype}
        # head_dim given: heads were pruned (ts.ChannelPrune), num_heads x head_dim < embed_dim
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        inner = num_heads * self.head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.has_bias = bias  # whether the projections have biases (they may become compressed layers)
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, inner, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, inner, **kw))
        else:
            self.bias_k = self.bias_v = None
        # What torch's transformer layers read to choose their fused path: no packed weights.
        # (torch.jit.script of an nn.TransformerEncoderLayer holding this fails: it compiles that
        # fused path, which needs torch's own attention; torch.compile / export / jit.trace run.)
        self._qkv_same_embed_dim = False
        self.in_proj_weight = self.in_proj_bias = None

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "ProjectedMultiheadAttention":
        """The same attention as `mha`. The q / k / v weights and biases are views of its packed
        tensors, out_proj is its out_proj module (an nn.Linear subclass keeping nn.Linear's
        forward) and bias_k / bias_v its parameters, so nothing is copied."""
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias, mha.bias_k is not None, mha.add_zero_attn,
                  mha.kdim, mha.vdim, mha.batch_first, device="meta")
        weights, biases = _packed_qkv(mha)
        grad = weights[0].requires_grad
        for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            lin.weight = nn.Parameter(w.detach(), requires_grad=grad)
            lin.bias = nn.Parameter(b.detach(), requires_grad=mha.in_proj_bias.requires_grad) if bias else None
        new.out_proj = mha.out_proj  # the module itself: its pruning mask, parametrization, hooks stay
        new.bias_k, new.bias_v = mha.bias_k, mha.bias_v
        new.train(mha.training)
        return new

    def write_back(self, mha: nn.MultiheadAttention) -> None:
        """Copy the projections' values (a technique may have edited them, e.g. a fold) into the
        nn.MultiheadAttention this was made from; q / k / v must still be nn.Linear layers, and
        out_proj that one's own module or an nn.Linear standing in for it."""
        with torch.no_grad():
            packed, biases = _packed_qkv(mha)
            for lin, w, b in zip((self.q_proj, self.k_proj, self.v_proj), packed, biases):
                _copy_into(w, lin.weight)
                if b is not None:
                    _copy_into(b, lin.bias)
            if self.out_proj is not mha.out_proj:  # a stand-in (linear_subclasses.py) sharing or replacing its parameters
                _copy_into(mha.out_proj.weight, self.out_proj.weight)
                if mha.out_proj.bias is not None:
                    _copy_into(mha.out_proj.bias, self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"ProjectedMultiheadAttention: query, key and value must all be 3-D (batched) or "
                             f"2-D (unbatched), got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        if batched and not self.batch_first:  # work batch-first: [N, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        elif not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        n, tgt, _ = query.shape
        self._check_shapes(query, key, value)
        padding = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention); "
                               "nn.Transformer.generate_square_subsequent_mask makes one")
        if is_causal and padding is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
            is_causal = is_causal and padding is None
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        heads, d = self.num_heads, self.head_dim
        if attn_mask is not None:
            attn_mask = self._mask_per_head(attn_mask, n, tgt, k.shape[1])
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            padding = F.pad(padding, (0, 1)) if padding is not None else None
        q = q.view(n, tgt, heads, d).transpose(1, 2)
        k = k.view(n, k.shape[1], heads, d).transpose(1, 2)
        v = v.view(n, v.shape[1], heads, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, heads, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, heads, 1, d)], dim=2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            padding = F.pad(padding, (0, 1)) if padding is not None else None
        src = k.shape[2]
        if padding is not None:
            if padding.shape != (n, src):
                raise ValueError(f"ProjectedMultiheadAttention: key_padding_mask must be [{n}, {src}] "
                                 f"(batch, source length), got {list(padding.shape)}")
            padding = padding.view(n, 1, 1, src)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal), None
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, heads * d))
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _check_shapes(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Batch-first [N, L, E] query, [N, S, kdim] key, [N, S, vdim] value, as torch's MHA checks."""
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"ProjectedMultiheadAttention: expected query / key / value widths {self.embed_dim} / "
                             f"{self.kdim} / {self.vdim}, got {query.shape[-1]} / {key.shape[-1]} / {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"ProjectedMultiheadAttention: key and value must have the same batch and sequence "
                             f"sizes as each other and the query's batch size (batch-first shapes query "
                             f"{list(query.shape)}, key {list(key.shape)}, value {list(value.shape)})")

    def _mask_per_head(self, mask: torch.Tensor, n: int, tgt: int, src: int) -> torch.Tensor:
        """attn_mask [L, S] or [N * heads, L, S] as [1 or N, 1 or heads, L, S]."""
        if mask.dim() == 2 and mask.shape == (tgt, src):
            return mask.view(1, 1, tgt, src)
        if mask.dim() == 3 and mask.shape == (n * self.num_heads, tgt, src):
            return mask.view(n, self.num_heads, tgt, src)
        raise ValueError(f"ProjectedMultiheadAttention: attn_mask must be [{tgt}, {src}] or "
                         f"[{n * self.num_heads}, {tgt}, {src}] (batch * heads, target, source), "
                         f"got {list(mask.shape)}")

    # --- what a saved file records of it (io.layer_specs / plan_layers) ---
    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        """Whether `mod` is the nn.MultiheadAttention a saved spec was made from (its dropout may
        differ: a training setting, not a shape; the loaded attention takes the file's)."""
        if isinstance(mod, ProjectedMultiheadAttention):  # unpacked (ts.unpack_attention): rebuilt as saved
            return dict(mod.spec(), dropout=spec.get("dropout")) == spec
        if type(mod) is not nn.MultiheadAttention:
            return False
        # a head-pruned file: ts.load has set num_heads to the file's (pruning/state.py) first;
        # the heads keep the width torch's class derived from the unpruned count
        made = _spec(mod.embed_dim, mod.num_heads, spec.get("dropout"), mod.in_proj_bias is not None,
                     mod.bias_k is not None, mod.add_zero_attn, mod.kdim, mod.vdim, mod.batch_first,
                     mod.head_dim)
        return made == spec

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "ProjectedMultiheadAttention":
        new = cls(spec["in_features"], spec["num_heads"], spec["dropout"], spec["bias"], spec["add_bias_kv"],
                  spec["add_zero_attn"], spec["kdim"], spec["vdim"], spec["batch_first"], device=device,
                  head_dim=spec.get("head_dim"))
        if new.bias_k is not None:  # filled by the file's tensors
            nn.init.zeros_(new.bias_k), nn.init.zeros_(new.bias_v)
        return new

    def spec(self) -> dict:
        return _spec(self.embed_dim, self.num_heads, self.dropout, self.has_bias, self.bias_k is not None,
                     self.add_zero_attn, self.kdim, self.vdim, self.batch_first, self.head_dim)

    def extra_repr(self) -> str:
        pruned = f", head_dim={self.head_dim}" if self.num_heads * self.head_dim != self.embed_dim else ""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{pruned}, batch_first={self.batch_first}"


def _packed_qkv(mha: nn.MultiheadAttention):
    """(q, k, v weights), (q, k, v biases or None): views of the packed tensors, or its separate
    q / k / v weights where kdim / vdim differ from embed_dim."""
    if mha._qkv_same_embed_dim:
        weights = tuple(mha.in_proj_weight.chunk(3))
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = tuple(mha.in_proj_bias.chunk(3)) if mha.in_proj_bias is not None else (None,) * 3
    return weights, biases


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if not (dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride()):  # a view of dst: nothing to do
        dst.copy_(src)


def _spec(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
          head_dim) -> dict:
    # kind / format / in_features / out_features / bias: the keys every saved layer has
    spec = {"kind": ProjectedMultiheadAttention.kind, "format": "unpacked", "in_features": embed_dim,
            "out_features": embed_dim, "bias": bool(bias), "num_heads": num_heads, "dropout": float(dropout or 0.0),
            "add_bias_kv": bool(add_bias_kv), "add_zero_attn": bool(add_zero_attn), "kdim": kdim, "vdim": vdim,
            "batch_first": bool(batch_first)}
    if num_heads * head_dim != embed_dim:  # heads pruned (files without the key: all heads)
        spec["head_dim"] = head_dim
    return spec
