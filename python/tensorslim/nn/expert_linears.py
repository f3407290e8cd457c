"""A mixture-of-experts layer's fused expert weights as one nn.Linear per expert and projection.

transformers 5 keeps a MoE block's experts (Mixtral, Qwen2 / Qwen3-MoE, OLMoE, DeepSeek, ...)
in one module holding 3-D parameters, `gate_up_proj` [experts, 2 x intermediate, hidden] (or
`up_proj` without a gate) and `down_proj` [experts, hidden, intermediate] (transposed in some
models), multiplied by its own code: no technique sees a layer there, yet they hold most of
the model's weights. ExpertLinears computes what that module's eager forward computes (each
token through its top-k experts, outputs weighted and summed) with `gate_up[e]` / `up[e]` and
`down[e]` as ordinary nn.Linear children, so ts.quantize / sparsify / factorize replace them
like any other linear. Made from a module of transformers' `use_experts_implementation`
classes without a post-expert norm whose gate is one of GATES: the default act(gate) * up over
concatenated halves, or GPT-OSS's clamped SwiGLU over interleaved gate / up rows (recognized by
computing the module's own `_apply_gate` on a probe); other experts modules are left as they are.
"""
import numbers
from typing import Optional, Tuple

import torch
from torch import nn

# "halves": act(gate) * up, gate and up the first and second half of the first projection's
# output. "gpt_oss": gate and up interleaved (even / odd outputs), gate clamped above at
# `limit`, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate) (OpenAI's
# gpt-oss model card, 2025).
GATES = ("halves", "gpt_oss")


def _act(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class ExpertLinears(nn.Module):
    kind = "expert_linears"

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, has_gate: bool, has_bias: bool,
                 hidden_act: str, device=None, dtype=None, gate: str = "halves", gate_alpha: Optional[float] = None,
                 gate_limit: Optional[float] = None):
        super().__init__()
        if min(num_experts, hidden_dim, intermediate_dim) <= 0:
            raise ValueError(f"ExpertLinears: num_experts ({num_experts}), hidden_dim ({hidden_dim}) and "
                             f"intermediate_dim ({intermediate_dim}) must be positive")
        if gate not in GATES or (gate == "gpt_oss" and not has_gate):
            raise ValueError(f"ExpertLinears: gate must be one of {GATES} (gpt_oss with a gate), got {gate!r}")
        if gate == "gpt_oss" and not all(_is_real(v) for v in (gate_alpha, gate_limit)):
            raise ValueError(f"ExpertLinears: the gpt_oss gate needs numbers gate_alpha and gate_limit, got "
                             f"{gate_alpha!r}, {gate_limit!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.has_gate, self.has_bias, self.hidden_act = has_gate, has_bias, hidden_act
        self.gate = gate
        self.gate_alpha, self.gate_limit = (float(gate_alpha), float(gate_limit)) if gate == "gpt_oss" else (None, None)
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
            from transformers.integrations import moe
        except ImportError:
            return "transformers' experts integration is not importable"
        flags = {a: getattr(experts, a, None) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                                                          "has_post_expert_norm")}
        if any(type(v) is not bool for v in flags.values()):
            return "not a transformers use_experts_implementation module"
        if flags["has_post_expert_norm"]:
            return "a norm after each expert"
        gate, why = _gate_of(experts, flags, moe._default_apply_gate) if flags["has_gate"] else ("halves", None)
        if why is not None:
            return why
        first = getattr(experts, "gate_up_proj" if flags["has_gate"] else "up_proj", None)
        down = getattr(experts, "down_proj", None)
        if not (isinstance(first, nn.Parameter) and isinstance(down, nn.Parameter) and first.dim() == 3
                and down.dim() == 3 and first.is_floating_point()):
            return "no 3-D gate_up_proj / up_proj and down_proj parameters"
        act = getattr(getattr(experts, "config", None), "hidden_act", None)
        if not isinstance(act, str) or (gate == "halves" and  # GPT-OSS's gate has its own activation
                                        type(_safe_act(act)) is not type(getattr(experts, "act_fn", None))):
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
        kind = "gpt_oss" if gate and not experts.is_concatenated else "halves"  # why_not checked which
        new = cls(e, hidden, inter, gate, experts.has_bias, experts.config.hidden_act, device="meta", gate=kind,
                  gate_alpha=getattr(experts, "alpha", None), gate_limit=getattr(experts, "limit", None))
        names = ("gate_up_proj" if gate else "up_proj", "down_proj")
        for lins, name in zip((new.first, new.down), names):
            w = getattr(experts, name)
            b = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
            for i, lin in enumerate(lins):
                wi = w[i].t() if experts.is_transposed else w[i]
                lin.weight = nn.Parameter(wi.detach(), requires_grad=w.requires_grad)
                lin.bias = nn.Parameter(b[i].detach(), requires_grad=b.requires_grad) if b is not None else None
        new.act_fn = getattr(experts, "act_fn", new.act_fn)
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
            h = self._gated(h) if self.has_gate else self.act_fn(h)
            h = self.down[e](h) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    def _gated(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate == "gpt_oss":
            return _gpt_oss_gate(h, self.gate_alpha, self.gate_limit)
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    # --- what a saved file records of it (io.layer_specs / plan_layers) ---
    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        if isinstance(mod, ExpertLinears):
            return mod.spec() == spec
        if cls.why_not(mod) is not None:
            return False
        made = cls.from_experts(mod).spec()
        count = intermediate_attr(mod)
        if count is not None:
            # a file pruned before compressing: ts.load has set the file's count (pruning/state.py),
            # the fused tensors it does not hold keep their size until replaced
            made["intermediate"] = getattr(mod, count)
        return made == spec

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "ExpertLinears":
        return cls(spec["num_experts"], spec["in_features"], spec["intermediate"], spec["has_gate"], spec["bias"],
                   spec["hidden_act"], device=device, gate=spec.get("gate", "halves"),
                   gate_alpha=spec.get("gate_alpha"), gate_limit=spec.get("gate_limit"))

    def spec(self) -> dict:
        # kind / format / in_features / out_features / bias: the keys every saved layer has
        spec = {"kind": self.kind, "format": "unfused", "in_features": self.hidden_dim,
                "out_features": self.hidden_dim, "bias": bool(self.has_bias), "num_experts": self.num_experts,
                "intermediate": self.intermediate_dim, "has_gate": bool(self.has_gate),
                "hidden_act": self.hidden_act}
        if self.gate != "halves":  # files written before other gates existed have none
            spec.update(gate=self.gate, gate_alpha=self.gate_alpha, gate_limit=self.gate_limit)
        return spec

    def extra_repr(self) -> str:
        gate = {"halves": self.has_gate, "gpt_oss": f"gpt_oss(alpha={self.gate_alpha}, limit={self.gate_limit})"}
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, gate={gate[self.gate]}, act={self.hidden_act}")


def intermediate_attr(experts: nn.Module) -> Optional[str]:
    """The int attribute a fused experts module keeps its neurons per expert in (Mixtral's
    `intermediate_dim`, GPT-OSS's `intermediate_size`), if any."""
    return next((a for a in ("intermediate_dim", "intermediate_size") if type(getattr(experts, a, None)) is int), None)


def _shape(w: torch.Tensor, transposed: bool):
    """(experts, out, in) of a fused weight stored [experts, out, in] or, transposed, [experts, in, out]."""
    return (w.shape[0], w.shape[2], w.shape[1]) if transposed else tuple(w.shape)


def _gpt_oss_gate(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _gate_of(experts: nn.Module, flags: dict, default_gate) -> Tuple[Optional[str], Optional[str]]:
    """(which of GATES the gated experts module computes, None) or (None, why it is none);
    default_gate: transformers' act(gate) * up."""
    own = getattr(type(experts), "_apply_gate", None)
    if flags["is_concatenated"]:
        if own is default_gate:
            return "halves", None
    else:
        alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
        if _is_real(alpha) and _is_real(limit) and own is not None:
            # the module's own gate against ours on values inside and past the clamp
            # (on the CPU by name: transformers builds models under a meta device context)
            probe = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), device="cpu")
            probe = probe * (2.0 * float(limit) + 1.0)
            try:
                with torch.no_grad():
                    theirs = own(experts, probe)
            except Exception:  # a gate that needs more than its input: not one of ours
                theirs = None
            if isinstance(theirs, torch.Tensor) and theirs.shape == (4, 8) and torch.allclose(
                    theirs.float(), _gpt_oss_gate(probe, float(alpha), float(limit)), rtol=1e-5, atol=1e-5):
                return "gpt_oss", None
    return None, "a gate of its own (neither act(gate) * up over concatenated halves nor GPT-OSS's)"


def _safe_act(name: str):
    try:
        return _act(name)
    except (KeyError, ImportError):
        return None
