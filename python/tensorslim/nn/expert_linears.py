"""A mixture-of-experts layer's fused expert weights as one nn.Linear per expert and projection.

transformers 5 keeps a MoE block's experts (Mixtral, Qwen2 / Qwen3-MoE, OLMoE, DeepSeek, ...)
in one module holding 3-D parameters, `gate_up_proj` [experts, 2 x intermediate, hidden] (or
`up_proj` without a gate) and `down_proj` [experts, hidden, intermediate] (transposed in some
models), multiplied by its own code: no technique sees a layer there, yet they hold most of
the model's weights. ExpertLinears computes what that module's eager forward computes (each
token through its top-k experts, outputs weighted and summed) with `gate_up[e]` / `up[e]` and
`down[e]` as ordinary nn.Linear children, so ts.quantize / sparsify / factorize replace them
like any other linear. Made from a module of transformers' `use_experts_implementation`
classes without a post-expert norm whose activation and gate it can name (a GateSpec), found
by computing the module's own `act_fn` and `_apply_gate` on a probe; other experts modules
are left as they are.
"""
import numbers
import weakref
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

GATE_LAYOUTS = ("halves", "interleaved")
GATE_FORMULAS = ("act", "gpt_oss")


@dataclass(frozen=True)
class GateSpec:
    """How the first projection's output becomes the down projection's input, for gated experts.
    layout: gate and up as the output's first and second half ("halves", transformers' default)
    or its even and odd features ("interleaved", GPT-OSS). limit: gate clamped above at it, up to
    [-limit, limit] (GPT-OSS, DeepSeek-V4, GLM-5, Hunyuan-V4). formula: act(gate) * up ("act"), or
    (up + 1) * gate * sigmoid(alpha * gate) ("gpt_oss", OpenAI's gpt-oss model card, 2025)."""

    layout: str = "halves"
    formula: str = "act"
    limit: Optional[float] = None
    alpha: Optional[float] = None

    def __post_init__(self):
        if self.layout not in GATE_LAYOUTS or self.formula not in GATE_FORMULAS:
            raise ValueError(f"GateSpec: layout must be one of {GATE_LAYOUTS} and formula one of {GATE_FORMULAS}, "
                             f"got {self.layout!r}, {self.formula!r}")
        if not all(v is None or _is_real(v) for v in (self.limit, self.alpha)) or \
                (self.alpha is None) != (self.formula == "act"):
            raise ValueError(f"GateSpec: limit must be None or a number, alpha a number exactly for the gpt_oss "
                             f"formula, got limit={self.limit!r}, alpha={self.alpha!r}")

    def __call__(self, h: torch.Tensor, act: nn.Module) -> torch.Tensor:
        gate, up = (h[..., ::2], h[..., 1::2]) if self.layout == "interleaved" else h.chunk(2, dim=-1)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(min=-self.limit, max=self.limit)
        if self.formula == "gpt_oss":
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return act(gate) * up


def _act(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class ExpertLinears(nn.Module):
    kind = "expert_linears"
    # While a calibrating transform runs (experts.py, a config's calibrate_all_experts): every
    # expert's linears take every token, so each is calibrated whatever the router picks; the
    # output still sums only the routed experts' rows.
    every_token = False

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, has_gate: bool, has_bias: bool,
                 hidden_act: str, device=None, dtype=None, gate: Optional[GateSpec] = None):
        super().__init__()
        if min(num_experts, hidden_dim, intermediate_dim) <= 0:
            raise ValueError(f"ExpertLinears: num_experts ({num_experts}), hidden_dim ({hidden_dim}) and "
                             f"intermediate_dim ({intermediate_dim}) must be positive")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.has_gate, self.has_bias, self.hidden_act = has_gate, has_bias, hidden_act
        self.gate = (gate or GateSpec()) if has_gate else None
        first = 2 * intermediate_dim if has_gate else intermediate_dim
        kw = {"bias": has_bias, "device": device, "dtype": dtype}
        ups = nn.ModuleList(_uninitialized_linear(hidden_dim, first, **kw) for _ in range(num_experts))
        if has_gate:
            self.gate_up = ups
        else:
            self.up = ups
        self.down = nn.ModuleList(_uninitialized_linear(intermediate_dim, hidden_dim, **kw) for _ in range(num_experts))
        self.act_fn = _act(hidden_act)

    @property
    def first(self) -> nn.ModuleList:
        return self.gate_up if self.has_gate else self.up

    @classmethod
    def why_not(cls, experts: nn.Module) -> Optional[str]:
        """None where `experts` is a fused experts module this class can stand in for, else why
        not (remembered while the module's type, tensors, plain attributes and act_fn stay the
        same: the check runs its forward)."""
        return cls._checked(experts)[0]

    @classmethod
    def _checked(cls, experts: nn.Module) -> Tuple[Optional[str], tuple]:
        """(why_not's answer, (activation name, GateSpec) where it is None), remembered."""
        flags = _flags(experts)
        if any(type(v) is not bool for v in flags.values()):
            return "not a transformers use_experts_implementation module", (None, None)
        try:
            plain = tuple(sorted((k, v) for k, v in vars(experts).items() if isinstance(v, (bool, int, float, str))))
            key = (type(experts), plain, id(getattr(experts, "act_fn", None)),
                   tuple((p.data_ptr(), p._version, p.shape, p.dtype, p.device)
                         for p in experts.parameters(recurse=False)))
        except RuntimeError:  # inference tensors keep no version counter: checked afresh
            return cls._check(experts, flags)
        seen = _CHECKED.get(experts)
        if seen is None or seen[0] != key:
            seen = _CHECKED[experts] = (key, cls._check(experts, flags))
        return seen[1]

    @classmethod
    def _check(cls, experts: nn.Module, flags: dict) -> Tuple[Optional[str], tuple]:
        if flags["has_post_expert_norm"]:
            return "a norm after each expert", (None, None)
        first = getattr(experts, "gate_up_proj" if flags["has_gate"] else "up_proj", None)
        down = getattr(experts, "down_proj", None)
        if not (isinstance(first, nn.Parameter) and isinstance(down, nn.Parameter) and first.dim() == 3
                and down.dim() == 3 and first.is_floating_point()):
            return "no 3-D gate_up_proj / up_proj and down_proj parameters", (None, None)
        described, why = _described(experts, flags["has_gate"], flags["is_concatenated"])
        if why is None:
            e, first_out, hidden = _shape(first, flags["is_transposed"])
            _, hidden2, inter = _shape(down, flags["is_transposed"])
            if e != down.shape[0] or hidden != hidden2 or first_out != (2 * inter if flags["has_gate"] else inter):
                why = f"expert weight shapes that disagree ({list(first.shape)}, {list(down.shape)})"
            elif min(e, hidden, inter) <= 0:
                why = f"empty expert weights ({list(first.shape)}, {list(down.shape)})"
            elif getattr(experts, "num_experts", e) != e:
                why = f"num_experts {experts.num_experts} for {e} experts' weights"
            # on meta tensors: a model built to load a file made after the forward check
            elif not any(p.is_meta for p in experts.parameters(recurse=False)):
                why = _forward_differs(experts, cls._made_from(experts, described))
        return why, described if why is None else (None, None)

    @classmethod
    def from_experts(cls, experts: nn.Module) -> "ExpertLinears":
        """The same experts; each nn.Linear's weight (and bias) is a view of the fused tensors
        (nothing copied; a transposed layout gives transposed views)."""
        why, described = cls._checked(experts)
        if why is not None:
            raise ValueError(f"ExpertLinears: {type(experts).__name__} cannot be unfused: {why}")
        return cls._made_from(experts, described)

    @staticmethod
    def _args(experts: nn.Module, described: tuple) -> tuple:
        """(num_experts, hidden, intermediate, has_gate, has_bias, activation, GateSpec) of a
        module why_not accepts, `described` its (activation, GateSpec)."""
        gate = experts.has_gate
        e, _, hidden = _shape(experts.gate_up_proj if gate else experts.up_proj, experts.is_transposed)
        inter = _shape(experts.down_proj, experts.is_transposed)[2]
        return (e, hidden, inter, gate, experts.has_bias) + tuple(described)

    @classmethod
    def _made_from(cls, experts: nn.Module, described: tuple) -> "ExpertLinears":
        *args, gate_spec = cls._args(experts, described)
        new = cls(*args, device="meta", gate=gate_spec)
        gate = experts.has_gate
        names = ("gate_up_proj" if gate else "up_proj", "down_proj")
        for lins, name in zip((new.first, new.down), names):
            w = getattr(experts, name)
            b = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
            for i, lin in enumerate(lins):
                wi = w[i].t() if experts.is_transposed else w[i]
                lin.weight = nn.Parameter(wi.detach(), requires_grad=w.requires_grad)
                lin.bias = nn.Parameter(b[i].detach(), requires_grad=b.requires_grad) if b is not None else None
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
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for e in range(self.num_experts) if self.every_token else hit:
            if e == self.num_experts:
                continue
            pos, tokens = torch.where(mask[e])
            x = hidden_states if self.every_token else hidden_states[tokens]
            h = self.first[e](x)
            h = self.down[e](self.gate(h, self.act_fn) if self.has_gate else self.act_fn(h))
            if self.every_token:
                h = h[tokens]
            out.index_add_(0, tokens, (h * top_k_weights[tokens, pos, None]).to(out.dtype))
        return out

    # --- what a saved file records of it (io.layer_specs / plan_layers) ---
    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        if isinstance(mod, ExpertLinears):
            return mod.spec() == spec
        why, described = cls._checked(mod)
        if why is not None:
            return False
        *args, gate_spec = cls._args(mod, described)
        made = _spec(*args, gate_spec)
        count = intermediate_attr(mod)
        if count is not None:
            # a file pruned before compressing: ts.load has set the file's count (pruning/state.py),
            # the fused tensors it does not hold keep their size until replaced
            made["intermediate"] = getattr(mod, count)
        return made == spec

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "ExpertLinears":
        gate = spec.get("gate")
        if gate is not None and not isinstance(gate, dict):
            raise ValueError(f"gate must be a dict of GateSpec's fields, got {gate!r}")
        return cls(spec["num_experts"], spec["in_features"], spec["intermediate"], spec["has_gate"], spec["bias"],
                   spec["hidden_act"], device=device, gate=GateSpec(**gate) if gate else None)

    def spec(self) -> dict:
        return _spec(self.num_experts, self.hidden_dim, self.intermediate_dim, self.has_gate, self.has_bias,
                     self.hidden_act, self.gate)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, gate={self.gate}, act={self.hidden_act}")


def _uninitialized_linear(n_in: int, n_out: int, bias: bool, device, dtype) -> nn.Linear:
    """An nn.Linear as its constructor makes it, less the random init: the experts' linears take
    the fused tensors' views or a file's values, and initializing thousands of them (on the meta
    device too) took most of a MoE model's load."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = n_in, n_out
    lin.weight = nn.Parameter(torch.empty(n_out, n_in, device=device, dtype=dtype))
    lin.bias = nn.Parameter(torch.empty(n_out, device=device, dtype=dtype)) if bias else None
    return lin


def _spec(num_experts: int, hidden: int, inter: int, has_gate: bool, has_bias: bool, act: str,
          gate: Optional[GateSpec]) -> dict:
    # kind / format / in_features / out_features / bias: the keys every saved layer has
    spec = {"kind": ExpertLinears.kind, "format": "unfused", "in_features": hidden, "out_features": hidden,
            "bias": bool(has_bias), "num_experts": num_experts, "intermediate": inter, "has_gate": bool(has_gate),
            "hidden_act": act}
    if has_gate and gate != GateSpec():  # files written before other gates existed have none
        spec["gate"] = asdict(gate)
    return spec


def intermediate_attr(experts: nn.Module) -> Optional[str]:
    """The int attribute a fused experts module keeps its neurons per expert in (Mixtral's
    `intermediate_dim`, GPT-OSS's `intermediate_size`), if any."""
    return next((a for a in ("intermediate_dim", "intermediate_size") if type(getattr(experts, a, None)) is int), None)


def _shape(w: torch.Tensor, transposed: bool):
    """(experts, out, in) of a fused weight stored [experts, out, in] or, transposed, [experts, in, out]."""
    return (w.shape[0], w.shape[2], w.shape[1]) if transposed else tuple(w.shape)


def _flags(experts: nn.Module) -> dict:
    """The layout flags transformers' use_experts_implementation gives a module (None where absent)."""
    return {a: getattr(experts, a, None) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                                                     "has_post_expert_norm")}


# experts module -> (its type, tensors and attributes when checked, (why_not's answer, (activation, GateSpec)))
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _forward_differs(experts: nn.Module, new: ExpertLinears) -> Optional[str]:
    """Why `new` does not compute what `experts`' own forward computes on a probe routing
    (tokens sent to its first and last expert with random weights), or None. The flags and the
    gate say how transformers' other implementations read the weights; the module's forward
    may still do more (a norm after its experts, routes of weight one) that no flag records.
    Inconclusive, so None, on meta tensors (a model being built to load a file made after this
    check) and where the module's output is not finite (uninitialized weights)."""
    params = list(experts.parameters(recurse=False))
    if any(p.is_meta for p in params):
        return None
    w = params[0]
    e, tokens, k = new.num_experts, 6, min(2, new.num_experts)
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([[0, e - 1], [e - 1, 0]] * (tokens // 2))[:, :k].to(w.device)
    weights = torch.rand(tokens, k, generator=g).to(w.device, w.dtype)
    x = torch.randn(tokens, new.hidden_dim, generator=g).to(w.device, w.dtype)
    try:
        with torch.no_grad():  # the class's forward itself: a user's hooks on the module see nothing
            want = type(experts).forward(experts, x, index, weights)
            got = new(x, index, weights)
    except Exception as err:
        return (f"a forward that does not take (hidden states, top-k indices, top-k weights) as transformers' "
                f"eager experts do ({type(err).__name__})")
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "a forward whose output is not the experts' weighted sum per token"
    if not (torch.isfinite(want).all() and torch.isfinite(got).all()):
        return None  # weights not set yet (torch.empty's): nothing to compare, as on meta tensors
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2  # half dtypes: other summation orders
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max()) + 1e-6):
        return ("a forward that computes more than its weights say (a norm after its experts, weights of its "
                "own: checked on a probe routing)")
    return None


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _probe(cols: int, scale: float) -> torch.Tensor:
    # on the CPU by name: transformers builds models under a meta device context
    return torch.randn(4, cols, generator=torch.Generator().manual_seed(0), device="cpu") * scale


def _same(fn, args, want: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            got = fn(*args)
    except Exception:  # a function that needs more than its input: not one we name
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(
        got.float(), want, rtol=1e-5, atol=1e-5)


# Parameter-free activations an experts module's act_fn may be besides its config's hidden_act
# (LFM2-MoE passes F.silu, Nemotron-H relu2 from another config field), by transformers' names.
_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "relu2",
                "relu6", "leaky_relu", "sigmoid", "tanh", "mish")


def _activation(experts: nn.Module) -> Optional[str]:
    """The name (transformers' ACT2FN) of the function the module's act_fn computes, the
    config's hidden_act first; None where none computes it on a probe."""
    fn = getattr(experts, "act_fn", None)
    if not callable(fn):
        return None
    x = _probe(16, 6.0)
    cfg = getattr(experts, "config", None)
    for name in dict.fromkeys(n for n in (getattr(cfg, "hidden_act", None),) + _ACTIVATIONS if isinstance(n, str)):
        act = _safe_act(name)
        if act is not None and not any(True for _ in act.parameters()) and _same(fn, (x,), act(x).float()):
            return name
    return None


def _described(experts: nn.Module, has_gate: bool, concatenated: bool
               ) -> Tuple[Tuple[Optional[str], Optional[GateSpec]], Optional[str]]:
    """((activation name, GateSpec or None), None) for an experts module whose activation and
    gate ExpertLinears computes, else ((None, None), why not). The gate: each GateSpec its
    attributes suggest, tried against the module's own `_apply_gate` on a probe spanning past
    any clamp."""
    act = _activation(experts)
    cfg_act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if not has_gate:
        return ((act, None), None) if act else ((None, None), "an activation tensorslim cannot name")
    own = getattr(type(experts), "_apply_gate", None)
    numbers_of = lambda names: [float(v) for v in (getattr(experts, n, None) for n in names) if _is_real(v)]
    limits, alphas = numbers_of(("limit", "swiglu_limit")), numbers_of(("alpha", "swiglu_alpha"))
    layout = "halves" if concatenated else "interleaved"
    candidates: List[Tuple[Optional[str], GateSpec]] = []
    # without an act_fn the gate calls its function itself (F.silu): the names it likely is, checked below
    acts = [act] if act else [n for n in dict.fromkeys((cfg_act, "silu", "gelu")) if isinstance(n, str)]
    for limit in [None] + limits:
        candidates += [(a, GateSpec(layout, "act", limit)) for a in acts]
        # the gpt_oss formula uses no act_fn: the config's name is kept for the record
        candidates += [(act or cfg_act or "silu", GateSpec(layout, "gpt_oss", limit, a)) for a in alphas]
    h = _probe(16, 2.0 * max(limits, default=3.0) + 1.0)
    for name, spec in candidates:
        if isinstance(name, str) and own is not None and \
                _same(own, (experts, h), spec(h, _safe_act(name) or nn.Identity()).float()):
            return (name, spec), None
    return (None, None), "a gate of its own (its _apply_gate computes none that tensorslim can name)"


def _safe_act(name: str):
    try:
        return _act(name)
    except Exception:  # an unknown name, or an activation that needs more than its name to build
        return None
