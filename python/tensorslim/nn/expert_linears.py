"""A mixture-of-experts layer's fused expert weights as one nn.Linear per expert and projection.

transformers 5 keeps a MoE block's experts (Mixtral, Qwen2 / Qwen3-MoE, OLMoE, DeepSeek, ...)
in one module holding 3-D parameters, `gate_up_proj` [experts, 2 x intermediate, hidden] (or
`up_proj` without a gate) and `down_proj` [experts, hidden, intermediate] (transposed in some
models), multiplied by its own code: no technique sees a layer there, yet they hold most of
the model's weights. ExpertLinears computes what that module's eager forward computes (each
token through its top-k experts, outputs weighted and summed) with `gate_up[e]` / `up[e]` and
`down[e]` as ordinary nn.Linear children, so ts.quantize / sparsify / factorize replace them
like any other linear. Made from a module of transformers' `use_experts_implementation`
classes with the default gate (act(gate) * up over concatenated halves) and no post-expert
norm; other experts modules (GPT-OSS's clamped gate) are left as they are.
"""
from typing import Optional

import torch
from torch import nn


def _act(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class ExpertLinears(nn.Module):
    kind = "expert_linears"

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, has_gate: bool, has_bias: bool,
                 hidden_act: str, device=None, dtype=None):
        super().__init__()
        if min(num_experts, hidden_dim, intermediate_dim) <= 0:
            raise ValueError(f"ExpertLinears: num_experts ({num_experts}), hidden_dim ({hidden_dim}) and "
                             f"intermediate_dim ({intermediate_dim}) must be positive")
        kw = {"device": device, "dtype": dtype}
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.has_gate, self.has_bias, self.hidden_act = has_gate, has_bias, hidden_act
        first = 2 * intermediate_dim if has_gate else intermediate_dim
        ups = nn.ModuleList(nn.Linear(hidden_dim, first, bias=has_bias, **kw) for _ in range(num_experts))
        if has_gate:
            self.gate_up = ups
        else:
            self.up = ups
        self.down = nn.ModuleList(nn.Linear(intermediate_dim, hidden_dim, bias=has_bias, **kw)
                                  for _ in range(num_experts))
        self.act_fn = _act(hidden_act)

    @property
    def first(self) -> nn.ModuleList:
        return self.gate_up if self.has_gate else self.up

    @staticmethod
    def why_not(experts: nn.Module) -> Optional[str]:
        """None where `experts` is a fused experts module this class can stand in for, else why not."""
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:
            return "transformers' experts integration is not importable"
        flags = {a: getattr(experts, a, None) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                                                          "has_post_expert_norm")}
        if any(type(v) is not bool for v in flags.values()):
            return "not a transformers use_experts_implementation module"
        if flags["has_post_expert_norm"]:
            return "a norm after each expert"
        if flags["has_gate"] and (not flags["is_concatenated"] or
                                  getattr(type(experts), "_apply_gate", None) is not _default_apply_gate):
            return "a gate of its own (not act(gate) * up over concatenated halves)"
        first = getattr(experts, "gate_up_proj" if flags["has_gate"] else "up_proj", None)
        down = getattr(experts, "down_proj", None)
        if not (isinstance(first, nn.Parameter) and isinstance(down, nn.Parameter) and first.dim() == 3
                and down.dim() == 3 and first.is_floating_point()):
            return "no 3-D gate_up_proj / up_proj and down_proj parameters"
        act = getattr(getattr(experts, "config", None), "hidden_act", None)
        if not isinstance(act, str) or type(_safe_act(act)) is not type(getattr(experts, "act_fn", None)):
            return "an activation other than its config's hidden_act"
        e, first_out, hidden = _shape(first, flags["is_transposed"])
        _, hidden2, inter = _shape(down, flags["is_transposed"])
        if e != down.shape[0] or hidden != hidden2 or first_out != (2 * inter if flags["has_gate"] else inter):
            return f"expert weight shapes that disagree ({list(first.shape)}, {list(down.shape)})"
        if getattr(experts, "num_experts", e) != e:
            return f"num_experts {experts.num_experts} for {e} experts' weights"
        return None

    @classmethod
    def from_experts(cls, experts: nn.Module) -> "ExpertLinears":
        """The same experts; each nn.Linear's weight (and bias) is a view of the fused tensors
        (nothing copied; a transposed layout gives transposed views)."""
        why = cls.why_not(experts)
        if why is not None:
            raise ValueError(f"ExpertLinears: {type(experts).__name__} cannot be unfused: {why}")
        gate = experts.has_gate
        first = experts.gate_up_proj if gate else experts.up_proj
        e, _, hidden = _shape(first, experts.is_transposed)
        inter = _shape(experts.down_proj, experts.is_transposed)[2]
        new = cls(e, hidden, inter, gate, experts.has_bias, experts.config.hidden_act, device="meta")
        names = ("gate_up_proj" if gate else "up_proj", "down_proj")
        for lins, name in zip((new.first, new.down), names):
            w = getattr(experts, name)
            b = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
            for i, lin in enumerate(lins):
                wi = w[i].t() if experts.is_transposed else w[i]
                lin.weight = nn.Parameter(wi.detach(), requires_grad=w.requires_grad)
                lin.bias = nn.Parameter(b[i].detach(), requires_grad=b.requires_grad) if b is not None else None
        new.act_fn = experts.act_fn
        new.train(experts.training)
        return new

    def write_back(self, experts: nn.Module) -> None:
        """Copy the linears' values (a technique may have edited them, e.g. a fold) into the
        fused module this was made from; they must still be nn.Linear layers."""
        names = ("gate_up_proj" if self.has_gate else "up_proj", "down_proj")
        with torch.no_grad():
            for lins, name in zip((self.first, self.down), names):
                w = getattr(experts, name)
                b = getattr(experts, f"{name}_bias", None) if self.has_bias else None
                for i, lin in enumerate(lins):
                    dst = w[i].t() if experts.is_transposed else w[i]
                    if dst.data_ptr() != lin.weight.data_ptr() or dst.stride() != lin.weight.stride():
                        dst.copy_(lin.weight)
                    if b is not None and b[i].data_ptr() != lin.bias.data_ptr():
                        b[i].copy_(lin.bias)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' eager experts forward: hidden_states [tokens, hidden], top_k_index /
        top_k_weights [tokens, k] (an index of num_experts marks an unused slot)."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, tokens = torch.where(mask[e])
            h = self.first[e](hidden_states[tokens])
            if self.has_gate:
                gate, up = h.chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            else:
                h = self.act_fn(h)
            h = self.down[e](h) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    # --- what a saved file records of it (io.layer_specs / plan_layers) ---
    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        if isinstance(mod, ExpertLinears):
            return mod.spec() == spec
        if cls.why_not(mod) is not None:
            return False
        made = cls.from_experts(mod).spec()
        if type(getattr(mod, "intermediate_dim", None)) is int:
            # a file pruned before compressing: ts.load has set the file's count (pruning/state.py),
            # the fused tensors it does not hold keep their size until replaced
            made["intermediate"] = mod.intermediate_dim
        return made == spec

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "ExpertLinears":
        return cls(spec["num_experts"], spec["in_features"], spec["intermediate"], spec["has_gate"], spec["bias"],
                   spec["hidden_act"], device=device)

    def spec(self) -> dict:
        # kind / format / in_features / out_features / bias: the keys every saved layer has
        return {"kind": self.kind, "format": "unfused", "in_features": self.hidden_dim,
                "out_features": self.hidden_dim, "bias": bool(self.has_bias), "num_experts": self.num_experts,
                "intermediate": self.intermediate_dim, "has_gate": bool(self.has_gate),
                "hidden_act": self.hidden_act}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, gate={self.has_gate}, act={self.hidden_act}")


def _shape(w: torch.Tensor, transposed: bool):
    """(experts, out, in) of a fused weight stored [experts, out, in] or, transposed, [experts, in, out]."""
    return (w.shape[0], w.shape[2], w.shape[1]) if transposed else tuple(w.shape)


def _safe_act(name: str):
    try:
        return _act(name)
    except (KeyError, ImportError):
        return None
