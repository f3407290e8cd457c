"""Fuses what a model does right after an Int8Conv into that conv's kernel: `act(conv(x))`,
`conv(x) + shortcut` and `act(conv(x) + shortcut)` (a ResNet block's tail), with act a ReLU,
ReLU6 (MobileNet), SiLU (EfficientNet) or exact GELU, become one call,
`conv(x, residual=shortcut, activation="relu")`, that oneDNN runs as post-ops while the output
is in registers. Each such torch op was a full pass over the activations and, on small CPUs, a
hand-over between oneDNN's threads and torch's.

For every module that calls an Int8Conv child, that module's own forward is traced with
torch.fx (each submodule a leaf, so the graph holds that forward's code only). Where a conv's
output, through FoldedBatchNorm / nn.Identity, is read by nothing but an activation, or by
nothing but an add (then an activation that is the add's only reader may follow too), the
nodes become one conv call. The rewritten forward is set on that module instance only: its class, submodules,
parameters, state_dict and saved files stay as they were (ts.load fuses again). With
calibration data the model's output on the first batch must stay the same, or that rewrite is
dropped. A forward that torch.fx cannot trace (control flow on tensor values), that takes
arguments with defaults, *args or keywords (tracing would take their branches as if given),
or that sets attributes on its module keeps its code.
Forward hooks on a fused-away activation module no longer fire for that call. torch.fx records
`a += b` on tensors as `a + b`, so a forward that relies on `shortcut += conv(x)` writing into a
tensor other code reads later sees that write no more (`shortcut.add_(conv(x))` is recorded as
it is and not fused; with calibration data the check above catches the rest).
"""
import copy
import inspect
import operator
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.int8_conv import FoldedBatchNorm, Int8Conv2d, _Int8ConvNd
from ..nn.int8_conv_chain import conv_chain, has_hooks
from .calibrate import eval_mode
from .smoothquant import outputs_match

# activation callables / methods / modules -> the kernel's name for them
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu",
                  F.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu"}
_ACT_NAMES = {"relu": "ReLU", "relu6": "ReLU6", "silu": "SiLU", "gelu": "GELU"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_IN_PLACE_ADDS = (operator.iadd, "add_")  # they write their first operand
# a fused epilogue rounds in another order, and the next conv may then flip an activation code
_TOLERANCE = (1e-3, 1e-5)


class FusedForward:
    """`forward` of a module instance whose conv epilogues were fused: the traced and rewritten
    forward code, run on the module itself (so it sees the module's current submodules).
    Traced in eval mode, which fixed the module's own `self.training` (dropout, `if
    self.training:`) at False: in training mode the class's own forward runs. Plain attributes
    only, so the module still deep-copies and pickles."""

    def __init__(self, module: nn.Module, graph_module: fx.GraphModule):
        self.module, self.graph_module = module, graph_module

    def __call__(self, *args, **kwargs):
        if self.module.training:
            return type(self.module).forward(self.module, *args, **kwargs)
        return type(self.graph_module).forward(self.module, *args, **kwargs)


def _inlined(m: nn.Module) -> bool:
    """An nn.Sequential with Sequential's own forward and no hooks: traced through, so a
    parent's graph sees the convs, norms and activations inside (torchvision's
    Conv2dNormActivation, a MobileNet block's `self.conv`)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and not has_hooks(m)


def _calls_convs(mod: nn.Module) -> bool:
    """Whether mod's own traced forward would call an Int8Conv: a child, or one inside
    children traced through."""
    return any(isinstance(c, _Int8ConvNd) or (_inlined(c) and _calls_convs(c)) for c in mod.children())


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not _inlined(m)


def fuse_conv_epilogues(model: nn.Module, check: Optional[Callable[[nn.Module], List[torch.Tensor]]] = None
                        ) -> Dict[str, str]:
    """Fuse every epilogue the model's forward code allows; {conv name: what was fused}.

    check: runs the model on sample data (the first calibration batch) and returns its
    outputs. When given, the rewritten forwards are kept only if the outputs stay the same
    (all at once, else module by module): a forward whose code torch.fx evaluated at trace
    time (a branch on an attribute, a global) would show here, not in users' results."""
    plans = []  # (module name, module, its fused forward, {conv: what})
    # traced and checked in eval mode: the graphs are inference's (FusedForward), and the check
    # must not move a training-mode BatchNorm's statistics
    with eval_mode(model):
        for name, mod in model.named_modules():
            if "forward" in mod.__dict__:  # fused already, or a forward the user set on the instance
                continue
            if _calls_convs(mod):
                try:
                    plan = _fused_forward(mod)
                except Exception as e:  # a rewrite this code cannot do: the forward stays as written
                    warnings.warn(f"conv epilogues of '{name or type(mod).__name__}' not fused: {e}", RuntimeWarning)
                    plan = None
                if plan is not None:
                    plans.append((name, mod) + plan)
        if check is not None and plans:
            plans = _checked(plans, check, model)
        else:
            _install(plans)
    fused = {}
    # parents last: a parent's forward that traced through a Sequential child runs instead of
    # that child's, so its account of the child's convs is the one that holds
    for name, mod, _, convs in reversed(plans):
        for conv, what in convs.items():
            mod.get_submodule(conv).epilogue = what
            fused[f"{name}.{conv}" if name else conv] = what
    return fused


@torch.no_grad()
def _checked(plans: list, check, model: nn.Module) -> list:
    """The plans whose rewritten forwards keep the model's output (installed), all at once
    where they do, else one by one."""
    try:
        ref = check(model)
    except Exception:  # the model itself does not run on the batch here: fuse nothing
        return []
    _install(plans)
    if _still_matches(check, model, ref):
        return plans
    _uninstall(plans)
    kept = []
    for p in plans:
        _install([p])
        if _still_matches(check, model, ref):
            kept.append(p)
        else:
            _uninstall([p])
    return kept


def _still_matches(check, model: nn.Module, ref: List[torch.Tensor]) -> bool:
    try:
        return outputs_match(ref, check(model), *_TOLERANCE)
    except Exception:  # a rewritten forward that fails on the batch is as wrong as one that differs
        return False


def _install(plans) -> None:
    for _, mod, forward, _ in plans:
        object.__setattr__(mod, "forward", forward)


def _uninstall(plans) -> None:
    for _, mod, _, _ in plans:
        mod.__dict__.pop("forward", None)


def _fused_forward(mod: nn.Module) -> Optional[Tuple[FusedForward, Dict[str, str]]]:
    """(the rewritten forward, {conv child: what it takes over}), or None where nothing fuses."""
    if not _plain_signature(mod):
        return None
    state = dict(mod.__dict__)
    contents = {k: copy.copy(v) for k, v in state.items() if type(v) in (list, dict, set)}
    try:
        graph = _ChildrenAsLeaves().trace(mod)
    except Exception:  # untraceable forward (data-dependent control flow, ...): keep it
        graph = None
    if (mod.__dict__.keys() != state.keys() or any(mod.__dict__[k] is not v for k, v in state.items())
            or any(not _same_contents(state[k], v) for k, v in contents.items())):
        # the forward sets attributes or writes into them (a cache, a counter, a list of
        # features): a traced graph would drop that, and tracing left proxies there; restore
        # and keep the forward
        for k, v in contents.items():
            if type(state[k]) is list:
                state[k][:] = v
            else:
                state[k].clear()
                state[k].update(v)
        mod.__dict__.clear()
        mod.__dict__.update(state)
        return None
    if graph is None:
        return None
    modules = dict(mod.named_modules())
    fused = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), _Int8ConvNd):
            what = _fuse_at(graph, node, modules)
            if what:
                fused[node.target] = what
    for conv, nxt in _chain_convs(graph, modules).items():
        if modules[conv].mode == "static" and modules[nxt].mode == "static":  # dynamic convs never hand codes on
            fused[conv] = " + ".join(filter(None, (fused.get(conv), f"requantize for {nxt}")))
    if not fused:
        return None
    graph.lint()
    return FusedForward(mod, fx.GraphModule(mod, graph)), fused


def _same_contents(now, before) -> bool:
    """Whether a list / dict / set attribute holds the same objects as its copy from before."""
    if len(now) != len(before):
        return False
    if type(now) is list:
        return all(a is b for a, b in zip(now, before))
    if type(now) is dict:
        return now.keys() == before.keys() and all(now[k] is before[k] for k in now)
    return {id(x) for x in now} == {id(x) for x in before}


def _plain_signature(mod: nn.Module) -> bool:
    """Whether every forward argument is a plain positional one. torch.fx traces an argument
    with a default as a tensor placeholder (`if mask is not None` is taken), so a call that
    leaves it out would run the wrong branch: such forwards keep their code."""
    try:
        params = inspect.signature(mod.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return all(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def _fuse_at(graph: fx.Graph, conv: fx.Node, modules: Dict[str, nn.Module]) -> str:
    """Rewrite the epilogue after one conv call (returns what was fused, '' for nothing)."""
    if len(conv.args) != 1 or conv.kwargs:
        return ""
    chain = [conv]
    while _only_user(chain[-1]) is not None and _is_passthrough(_only_user(chain[-1]), modules):
        chain.append(_only_user(chain[-1]))
    nxt = _only_user(chain[-1])
    if nxt is None:
        return ""
    residual, activation = None, ""
    act = _activation(nxt, chain[-1], modules)
    if act:
        chain.append(nxt)
        activation = act
    else:
        residual = _add_operand(nxt, chain[-1])
        if residual is None:
            return ""
        chain.append(nxt)
        after = _only_user(nxt)
        act = _activation(after, nxt, modules) if after is not None else ""
        if act:
            chain.append(after)
            activation = act
    last = chain[-1]
    with graph.inserting_before(last):
        kwargs = {"activation": activation} if residual is None else {"residual": residual, "activation": activation}
        new = graph.call_module(conv.target, conv.args, kwargs)
    last.replace_all_uses_with(new)
    for n in reversed(chain):
        graph.erase_node(n)
    parts = (["residual add"] if residual is not None else []) + ([_ACT_NAMES[activation]] if activation else [])
    return " + ".join(parts)


def _chain_convs(graph: fx.Graph, modules: Dict[str, nn.Module]) -> Dict[str, str]:
    """Rewrite each run of Int8Conv2d calls in which every conv reads only the previous one's
    output (after _fuse_at: no residual but on the last) into one conv_chain call, which hands
    codes from conv to conv where it can; {conv: the next conv} for each conv handing on. A
    strided 1 x 1 conv, which reads every stride-th position, can only start a run."""
    handed, seen = {}, set()
    for node in list(graph.nodes):
        if node in seen or not _conv_call(node, modules) or "residual" in node.kwargs:
            continue
        run = [node]
        while "residual" not in run[-1].kwargs:
            nxt = _only_user(run[-1])
            if (nxt is None or not _conv_call(nxt, modules) or nxt.args[0] is not run[-1]
                    or modules[nxt.target]._pick is not None  # a strided 1 x 1 conv picks its input first
                    or nxt.kwargs.get("residual") is run[-1]):  # conv2(h) + h: h is read twice
                break
            run.append(nxt)
        seen.update(run)
        if len(run) < 2:
            continue
        last = run[-1]
        with graph.inserting_before(last):
            convs = tuple(graph.get_attr(n.target) for n in run)
            chain = graph.call_function(conv_chain, (convs, tuple(n.kwargs.get("activation", "") for n in run),
                                                     node.args[0], last.kwargs.get("residual")))
        last.replace_all_uses_with(chain)
        for n in reversed(run):
            graph.erase_node(n)
        handed.update((a.target, b.target) for a, b in zip(run, run[1:]))
    return handed


def _conv_call(node: fx.Node, modules) -> bool:
    """A call of an Int8Conv2d on one tensor, with at most the epilogue keywords _fuse_at gives."""
    return (node.op == "call_module" and type(modules.get(node.target)) is Int8Conv2d and len(node.args) == 1
            and set(node.kwargs) <= {"residual", "activation"})


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_passthrough(node: fx.Node, modules) -> bool:
    return (node.op == "call_module" and type(modules.get(node.target)) in (FoldedBatchNorm, nn.Identity)
            and len(node.args) == 1 and not node.kwargs)


def _activation(node: fx.Node, src: fx.Node, modules) -> str:
    """The kernel's name for the activation node applies to src (in place or not; src is read
    by nothing else), or ''."""
    if node.args[:1] != (src,) or len(node.args) != 1:
        return ""
    if node.op == "call_function":
        name = _ACT_FUNCTIONS.get(node.target, "")
        if name == "gelu":
            return name if node.kwargs.get("approximate", "none") == "none" and set(node.kwargs) <= {"approximate"} else ""
        return name if set(node.kwargs) <= {"inplace"} else ""
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target, "") if not node.kwargs else ""
    if node.op == "call_module":
        mod = modules.get(node.target)
        name = _ACT_MODULES.get(type(mod), "")
        return name if name != "gelu" or mod.approximate == "none" else ""
    return ""


def _add_operand(node: fx.Node, src: fx.Node) -> Optional[fx.Node]:
    """The other operand where node computes src + other (plain add, no alpha), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS) or
              (node.op == "call_method" and node.target in ("add", "add_")))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if a is src and isinstance(b, fx.Node) and b is not src:
        return b
    # other + src in place would write `other`: only a plain add may have src second
    if b is src and isinstance(a, fx.Node) and a is not src and node.target not in _IN_PLACE_ADDS:
        return a
    return None

