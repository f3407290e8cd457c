"""Channel dependencies of a CNN-style model, from a torch.fx trace run on example inputs.

Every value carrying channels is tracked as segments of spaces along its channel dimension:
convolutions and linears (transformers' Conv1D too, traced as a leaf: its output channels are
weight columns) start a space (their outputs) and consume their input's spaces (their input
columns; a grouped conv keeps its inputs and prunes its filters group by group); BatchNorm,
depthwise convs, activations, pooling and dropout pass channels through, and GroupNorm too
where its input's units are its groups (a conv a GroupNorm normalizes starts a space of
whole groups, and so do those summed with it); additions and products merge spaces
(residual groups, gates); concatenation along the channel dimension chains segments, and a
split along it (`.chunk(2, dim=-1)`, a GLU: a gate and its values from one layer) hands each
part its segments (the layer's output starts as one space per part); flatten turns each
channel into rep = H*W features. A value that reaches any other operation makes its spaces
unsupported (an error if they are selected), and one that reaches the model input or output
freezes them, as does an addition with a tensor the graph does not follow (a parameter, an
embedding's output). A layer called more than once (shared weights) joins its calls' inputs
and gives every call the first call's output spaces; calls whose inputs do not line up
freeze them. torch's attentions and transformer layers (attention_heads.TORCH_BLOCKS) read
and write their width whole: their inputs and outputs keep every channel; their heads and
FFN neurons are spaces of their own (attention_heads.py, channel_rules.py).
"""
import collections
import contextlib
import inspect
import io
import math
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..conv1d import feature_attrs, feature_dims, is_conv1d, linear_shape
from .attention_heads import ATTENTIONS, TORCH_BLOCKS, block_owners
from .channel_space import Slice, Spaces

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.LeakyReLU,
                nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Hardsigmoid,
                nn.Upsample, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh, nn.Dropout1d, nn.Dropout3d)
PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish,
                  F.leaky_relu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                  F.adaptive_max_pool2d, torch.nn.functional.hardsigmoid, F.interpolate, F.mish, F.elu, F.selu,
                  F.celu, F.softplus, F.hardtanh, torch.clamp, torch.abs, torch.neg, operator.neg, torch.exp,
                  torch.square, torch.sqrt, F.dropout1d, F.dropout2d, F.dropout3d}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "sigmoid_", "tanh_", "clamp", "clamp_",
                "abs", "neg", "float", "half", "bfloat16", "to", "detach", "exp", "square", "sqrt"}
# Operations whose dimension arguments must be known when tracing (view / reshape / squeeze
# are read from the shapes before and after instead).
DIM_FUNCTIONS = {torch.cat, torch.concat, torch.mean, torch.flatten, torch.permute, torch.transpose}
DIM_METHODS = {"mean", "flatten", "permute", "transpose"}
DIVISIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide"}
# Pooling and resizing pass channels through only where the channels are dim 1 (N, C, ...): on
# a linear's (N, L, C) output they would pool the features.
SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
SPATIAL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate}
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Channel for channel operations of two tensors: residual additions, differences, and products
# (a squeeze-and-excitation scale, a SwiGLU gate). Not division: the check's zeroed channels
# would divide by zero.
ELEMENTWISE = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
               operator.mul, operator.imul, torch.mul}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WEIGHT_LAYERS = CONVS + TRANSPOSED_CONVS + (nn.Linear,)  # with transformers' Conv1D (is_conv1d)
LAYER_CLASSES = WEIGHT_LAYERS + NORMS  # traced whole, subclasses too


@dataclass
class Info:
    segs: List[Tuple[int, int]]  # (space id, rep) in order along the channel dim
    cdim: int


class _Tracer(fx.Tracer):
    """fx's tracer, keeping transformers' Conv1D whole (a call_module, as nn.Linear is)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a subclass of a layer that keeps its forward (a custom init, extra attributes) is that layer
        base = next((c for c in LAYER_CLASSES if isinstance(m, c)), None)
        return (is_conv1d(m) or (base is not None and type(m).forward is base.forward)
                or isinstance(m, TORCH_BLOCKS) or super().is_leaf_module(m, qualname))


def trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """fx graph of `model` with shapes from one forward pass; a ValueError when it does not trace."""
    from ..quantization.calibrate import eval_mode

    # arguments given as None (or another non-tensor) are traced as the constants they are:
    # `if mask is None` then takes the branch the example runs
    names = list(inspect.signature(model.forward).parameters)
    concrete = {n: v for n, v in zip(names, example_inputs) if not isinstance(v, torch.Tensor)}
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model, concrete_args=concrete or None), type(model).__name__)
        # no BatchNorm statistics moved, modes restored; fx prints the traceback of a failing
        # node itself, and the error below says what failed in one line
        with torch.no_grad(), eval_mode(model), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...) for untraceable code
        raise ValueError(f"the model does not trace with torch.fx ({first_line(e)})") from None
    return gm


def first_line(e: BaseException) -> str:
    """`Type: message` of the error that started it all, its first line (fx's ShapeProp wraps
    the model's own error in a message that carries a whole traceback)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _shape(node) -> Optional[Tuple[int, ...]]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def build_spaces(model: nn.Module, gm: fx.GraphModule, follow_splits: bool = True) -> Spaces:
    """follow_splits: hand a split along the channels (`chunk(2, dim=-1)`) each part's channels;
    False where the check failed with them (code sizing a split from the width, `split(64)`)."""
    sp = Spaces()
    info: Dict[fx.Node, Info] = {}
    mods = dict(model.named_modules())

    def new_space(name: str, size: int, params, attrs, weight_dim: int = 0, offset: int = 0, rep: int = 1) -> int:
        sid = sp.new(size)
        s = sp.get(sid)
        s.producers.append(name)
        s.slices += [Slice(name, p, weight_dim if p == "weight" else 0, offset, rep) for p in params]
        s.attrs += attrs
        s.width = rep
        return sid

    def output_spaces(node, name: str, size: int, params, attr: str, weight_dim: int) -> List[Tuple[int, int]]:
        """A layer's output channels: one space, or one per part where its output is split; units
        of `rep` consecutive channels where a GroupNorm takes them (its groups go whole)."""
        segs, off, rep = [], 0, group_reps.get(node, 1)
        for part in split_outputs.get(node, [size]):
            segs.append((new_space(name, part // rep, params, [(name, attr, rep)], weight_dim, off, rep), rep))
            off += part
        return segs

    def spaces_of(x) -> List[int]:
        i = info.get(x) if isinstance(x, fx.Node) else None
        return [sid for sid, _ in i.segs] if i else []

    def mark(x, why: str, frozen: bool = False):
        for sid in spaces_of(x):
            (sp.get(sid).frozen if frozen else sp.get(sid).unsupported).append(why)

    def consume(name: str, x, param: str, dim: int, attr: str):
        i = info.get(x)
        if i is None:
            return
        off = 0
        for sid, rep in i.segs:
            s = sp.get(sid)
            s.slices.append(Slice(name, param, dim, off, rep))
            s.attrs.append((name, attr, rep))
            off += s.size * rep

    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    split_outputs = _split_layers(gm, mods) if follow_splits else {}  # linear node: its parts' sizes
    group_reps = _group_norm_reps(gm, mods)  # conv node: channels per unit (a GroupNorm's groups)
    split_parts: Dict[fx.Node, List[Info]] = {}
    first_call: Dict[str, Tuple[Optional[Info], fx.Node]] = {}  # shared layers: the first call's input, node
    owners = block_owners(model)  # the autograd graph shows the layers inside torch's blocks
    attention_out: Dict[fx.Node, int] = {}  # an attention module's (output, weights) tuple: its space
    # Whether a node's value reaches a weight layer: an operation the graph does not know
    # that only leads to the model output (logits / T, masked_fill, a log) keeps its input's
    # channels whole, as the output itself does, instead of failing the whole prune.
    feeds_layer: Dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        feeds_layer[node] = any(
            (u.op == "call_module" and _weight_layer(mods.get(u.target))) or feeds_layer.get(u, False)
            for u in node.users)
    for node in gm.graph.nodes:
        # keyword operands too: torch.add(x, other=y) is the same residual as x + y
        args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                sid = sp.new(shape[1])
                sp.get(sid).frozen.append("model input")
                info[node] = Info([(sid, 1)], 1)
            continue
        if node.op == "output":
            for a in node.all_input_nodes:
                mark(a, "model output", frozen=True)
            continue
        if node.op == "get_attr":
            continue
        x = args[0] if args else None
        xi = info.get(x) if x is not None else None
        if node.op == "call_module":
            m = mods[node.target]
            name = node.target
            if isinstance(m, TORCH_BLOCKS) or name in owners:
                block = owners.get(name, name)
                for a in args:  # query / key / value, src / tgt / memory: their width whole
                    mark(a, f"input of '{block}' ({type(mods[block]).__name__})", frozen=True)
                width = m.embed_dim if isinstance(m, ATTENTIONS) else shape[-1] if shape else None
                if width is not None:  # its output (an attention's: out[0]), whole as well
                    sid = sp.new(width)
                    sp.get(sid).frozen.append(f"output of '{block}' ({type(mods[block]).__name__})")
                    if isinstance(m, ATTENTIONS) and name == block:
                        attention_out[node] = sid
                    else:
                        info[node] = Info([(sid, 1)], len(shape) - 1)
                continue
            if calls[name] > 1 and (_weight_layer(m) or isinstance(m, NORMS)):
                # one weight serving several calls (a Siamese tower, ALBERT's one layer at every
                # depth, a conv applied twice): every call's input channels are the same weight
                # columns, so they are joined, and every call's output is the first call's space
                if name not in first_call:
                    first_call[name] = (xi, node)  # read as any layer below
                else:
                    fin, fnode = first_call[name]
                    fout = info.get(fnode)
                    lined = fout is not None and shape is not None and (
                        (fin is None and xi is None) or (fin is not None and xi is not None and fin.cdim == xi.cdim
                                                         and _join(fin.segs, xi.segs, sp, f"layer '{name}'")))
                    if lined:
                        info[node] = Info(fout.segs, len(shape) - 1 if isinstance(m, nn.Linear) or is_conv1d(m)
                                          else fout.cdim)
                    else:
                        why = f"layer '{name}' runs {calls[name]} times (shared weights) on inputs that do not line up"
                        for i in (fin, xi, fout):
                            for sid, _ in (i.segs if i is not None else []):
                                sp.get(sid).frozen.append(why)
                    continue
            if isinstance(m, CONVS + TRANSPOSED_CONVS) and xi is not None and xi.cdim != 1:
                # a conv reads dim 1 as its channels: here another dimension (a linear's (N, L, C)
                # output) that it must keep whole; its own outputs are channels as usual
                mark(x, f"conv '{name}' reads a dimension other than the channels")
                x = xi = None
            if isinstance(m, CONVS):
                if m.groups == 1:
                    consume(name, x, "weight", 1, "in_channels")
                    params = ["weight"] + (["bias"] if m.bias is not None else [])
                    info[node] = Info(output_spaces(node, name, m.out_channels, params, "out_channels", 0), 1)
                elif m.groups == m.in_channels == m.out_channels and xi is not None:
                    for sid, rep in xi.segs:  # depthwise: filter c follows input channel c
                        if rep != 1:
                            sp.get(sid).unsupported.append(f"depthwise conv '{name}' after a flatten")
                    off = 0
                    for sid, _ in xi.segs:
                        s = sp.get(sid)
                        s.slices += [Slice(name, p, 0, off) for p in ("weight", "bias") if getattr(m, p) is not None]
                        s.attrs += [(name, a, 1) for a in ("in_channels", "out_channels", "groups")]
                        off += s.size
                    info[node] = Info(list(xi.segs), xi.cdim)
                else:
                    # A grouped conv's filters are pruned, as many from each group (out_channels stays a
                    # multiple of groups); its input channels are kept: group j's filters read input
                    # channels of group j only, so removing one would need a different column per group.
                    mark(x, f"grouped conv '{name}' (groups={m.groups}) input", frozen=True)
                    params = ["weight"] + (["bias"] if m.bias is not None else [])
                    sid = new_space(name, m.out_channels, params, [(name, "out_channels", 1)])
                    sp.get(sid).groups = m.groups
                    info[node] = Info([(sid, 1)], 1)
            elif isinstance(m, TRANSPOSED_CONVS) and m.groups == 1:
                # weight [in, out, k...]: input channels are rows, output channels columns
                consume(name, x, "weight", 0, "in_channels")
                params = ["weight"] + (["bias"] if m.bias is not None else [])
                sid = new_space(name, m.out_channels, params, [(name, "out_channels", 1)], weight_dim=1)
                info[node] = Info([(sid, 1)], 1)
            elif isinstance(m, nn.Linear) or is_conv1d(m):
                (out_dim, in_dim), (out_attr, in_attr) = feature_dims(m), feature_attrs(m)
                if xi is not None and (_shape(x) is None or xi.cdim != len(_shape(x)) - 1):
                    mark(x, f"linear '{name}' reads a non-channel dimension")
                else:
                    consume(name, x, "weight", in_dim, in_attr)
                params = ["weight"] + (["bias"] if m.bias is not None else [])
                segs = output_spaces(node, name, linear_shape(m)[1], params, out_attr, out_dim)
                if shape is None:  # the autograd pass recorded none (no gradient reached it)
                    sp.get(segs[0][0]).unsupported.append(f"no output shape recorded for '{name}'")
                else:
                    info[node] = Info(segs, len(shape) - 1)
            elif isinstance(m, NORMS) and xi is not None:
                if xi.cdim != 1 or any(rep != 1 for _, rep in xi.segs):  # normalizes dim 1, per feature
                    mark(x, f"BatchNorm '{name}' normalizes a dimension other than the channels "
                            f"(after a flatten, or a (N, L, C) input)")
                    continue
                off = 0
                for sid, _ in xi.segs:  # per-channel statistics follow each segment
                    s = sp.get(sid)
                    s.slices += [Slice(name, p, 0, off) for p in ("weight", "bias", "running_mean", "running_var")
                                 if getattr(m, p, None) is not None]
                    s.attrs.append((name, "num_features", 1))
                    off += s.size
                info[node] = xi
            elif isinstance(m, nn.GroupNorm) and xi is not None and m.affine:
                per = m.num_channels // m.num_groups  # statistics per group: groups go whole
                if xi.cdim != 1 or any(rep != per for _, rep in xi.segs):
                    mark(x, f"GroupNorm '{name}' would lose channels out of whole groups of {per}", frozen=True)
                    continue
                off = 0
                for sid, rep in xi.segs:
                    s = sp.get(sid)
                    s.slices += [Slice(name, p, 0, off, rep) for p in ("weight", "bias")]
                    s.attrs += [(name, "num_channels", rep), (name, "num_groups", 1)]
                    off += s.size * rep
                info[node] = xi
            elif isinstance(m, SPATIAL_MODULES) and xi is not None and xi.cdim != 1:
                mark(x, f"pooling '{name}' runs over the channel dimension of a (N, L, C) tensor")
            elif isinstance(m, PASS_MODULES):
                if xi is not None:
                    info[node] = xi
            elif isinstance(m, nn.Flatten):
                _flatten(node, x, xi, info, m.start_dim, mark, m.end_dim)
            elif isinstance(m, nn.GLU) and follow_splits and (halves := _split_parts(node, xi, sp, mods)) is not None:
                if _join(halves[0], halves[1], sp, f"'{name}'"):
                    info[node] = Info(halves[0], xi.cdim)
                else:
                    mark(x, f"GLU '{name}' multiplies halves whose channels do not line up", frozen=True)
            else:
                mark(x, f"module '{name}' ({type(m).__name__}) is not understood by the channel graph")
            continue
        target = node.target
        if (node.op == "call_function" and target is getattr) or \
                (node.op == "call_method" and target in ("size", "dim")):
            continue  # x.shape, x.size(0): read, not computed on
        if target is operator.getitem and x in split_parts:
            info[node] = split_parts[x][node.args[1]]
            continue
        if target is operator.getitem and x in attention_out:
            if node.args[1] == 0 and shape is not None:
                info[node] = Info([(attention_out[x], 1)], len(shape) - 1)
            elif node.args[1] == 1 and node.users:  # averaged over the heads: removing one changes them
                sp.keep_heads[x.target] = "its attention weights are used"
            continue
        takes_dims = target in DIM_FUNCTIONS if node.op == "call_function" else target in DIM_METHODS
        parts = _split_parts(node, xi, sp, mods) if follow_splits else None  # other splits: not understood (below)
        dim_args = (*node.args[1:], *(v for k, v in node.kwargs.items() if k not in ("input", "tensors")))
        if takes_dims and not _const(dim_args):
            for a in node.all_input_nodes:
                mark(a, f"'{node.name}' takes a dimension or size computed at run time")
        elif node.op == "call_function" and target in SPATIAL_FUNCTIONS and xi is not None and xi.cdim != 1:
            mark(x, f"'{node.name}' pools over the channel dimension of a (N, L, C) tensor")
        elif (node.op == "call_function" and target in PASS_FUNCTIONS) or \
                (node.op == "call_method" and target in PASS_METHODS):
            if len(args) > 1:  # another tensor in it (a clamp bound): channels it does not line up
                for a in args:
                    mark(a, f"'{node.name}' combines tensors the channel graph does not line up")
            elif xi is not None:
                info[node] = xi
        elif _is_elementwise(node):
            _elementwise(node, args, info, sp, mark)
        elif target in DIVISIONS and node.op in ("call_function", "call_method"):
            if len(args) == 1 and x is (node.args[0] if node.args else None) and xi is not None:
                info[node] = xi  # by a number (h_swish's / 6): channel for channel
            else:  # by a tensor: the check's zeroed channels would divide by zero
                for a in args:
                    mark(a, f"'{node.name}' divides by a tensor")
        elif (node.op == "call_method" and target in ("view", "reshape", "squeeze", "unsqueeze")) or \
                (node.op == "call_function" and target in (torch.reshape, torch.squeeze, torch.unsqueeze)):
            _reshape(node, x, xi, info, mark)
        elif node.op == "call_function" and target in (torch.cat, torch.concat):
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", [])
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            parts = [info.get(t) for t in tensors]
            ndim = len(shape) if shape is not None else None  # no shape: no gradient reached it
            if ndim and all(p is not None for p in parts) and all(p.cdim == dim % ndim for p in parts):
                info[node] = Info([s for p in parts for s in p.segs], dim % ndim)
            else:
                for t in tensors:
                    mark(t, f"'{node.name}' concatenates along a non-channel dimension or with an unknown tensor")
        elif parts is not None and _is_glu(node, mods):  # a * sigmoid(b) of its halves: unit for unit
            if _join(parts[0], parts[1], sp, f"'{node.name}'"):
                info[node] = Info(parts[0], xi.cdim)
            else:
                mark(x, f"'{node.name}' multiplies halves whose channels do not line up", frozen=True)
        elif parts is not None:  # a split along the channels, at boundaries of its segments
            split_parts[node] = [Info(segs, xi.cdim) for segs in parts]
            sp.guesses += 1
        elif (node.op == "call_method" and target in ("permute", "transpose")) or \
                (node.op == "call_function" and target in (torch.permute, torch.transpose)):
            _move(node, x, xi, info, mark)  # channels-last blocks (ConvNeXt), patch tokens (ViT)
        elif (node.op == "call_function" and target is torch.flatten) or \
                (node.op == "call_method" and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            _flatten(node, x, xi, info, start, mark, end)
        elif (node.op == "call_method" and target == "mean") or \
                (node.op == "call_function" and target is torch.mean):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            keep = node.kwargs.get("keepdim", False)
            nd = len(_shape(x)) if x is not None and _shape(x) else 0
            dims = [d % nd for d in dims] if nd else dims
            if xi is not None and dims and xi.cdim not in dims:
                info[node] = Info(xi.segs, xi.cdim if keep else xi.cdim - sum(d < xi.cdim for d in dims))
            else:
                mark(x, f"'{node.name}' averages over channels")
        else:
            what = node.meta.get("autograd_op") or (target if isinstance(target, str) else getattr(target, "__name__", target))
            for a in node.all_input_nodes:
                if feeds_layer[node]:
                    mark(a, f"'{node.name}' ({what}) is not understood by the channel graph")
                else:
                    mark(a, f"model output (through '{node.name}' ({what}))", frozen=True)
    traced = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    sp.untraced = [n for n, m in mods.items() if n and n not in traced and n not in owners and _weight_layer(m)]
    return sp


def _weight_layer(m: Optional[nn.Module]) -> bool:
    return isinstance(m, WEIGHT_LAYERS) or is_conv1d(m)


def _is_elementwise(node) -> bool:
    """A sum, difference or product of tensors (_elementwise joins its operands' spaces)."""
    return (node.op == "call_function" and node.target in ELEMENTWISE) or \
        (node.op == "call_method" and node.target in ELEMENTWISE_METHODS)


def _is_glu(node, mods) -> bool:
    return (node.op == "call_function" and node.target is F.glu) or \
        (node.op == "call_module" and isinstance(mods.get(node.target), nn.GLU))


def _split_args(node, mods) -> Optional[Tuple[List[int], int]]:
    """(part sizes, dim >= 0) of a split or chunk node with sizes known when tracing
    (torch.split / chunk, Tensor.split / chunk; the autograd graph's are torch.split), or of a
    GLU's two halves (F.glu, nn.GLU), else None."""
    x = node.args[0] if node.args else None
    shp = _shape(x) if isinstance(x, fx.Node) else None
    if _is_glu(node, mods):
        dim = mods[node.target].dim if node.op == "call_module" else \
            node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        if shp is None or not isinstance(dim, int) or shp[dim % len(shp)] % 2:
            return None
        return [shp[dim % len(shp)] // 2] * 2, dim % len(shp)
    if not ((node.op == "call_function" and node.target in (torch.split, torch.chunk)) or
            (node.op == "call_method" and node.target in ("split", "chunk"))):
        return None
    how = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get(
        "split_size_or_sections", node.kwargs.get("split_size")))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if shp is None or not _const(how) or not isinstance(dim, int) or how is None:
        return None
    dim %= len(shp)
    n = shp[dim]
    if isinstance(how, (list, tuple)):
        return [int(v) for v in how], dim
    if node.target in (torch.chunk, "chunk"):
        how = -(-n // int(how))  # chunks of ceil(n / k), the last one shorter
    return [min(int(how), n - o) for o in range(0, n, int(how))], dim


def _parts(xi: Info, sp: Spaces, sizes: List[int]) -> Optional[List[List[Tuple[int, int]]]]:
    """xi's segments grouped into consecutive parts of `sizes` channels, or None where a part
    would cut a segment."""
    parts, segs = [], list(xi.segs)
    for size in sizes:
        part, width = [], 0
        while segs and width < size:
            sid, rep = segs.pop(0)
            part.append((sid, rep))
            width += sp.get(sid).size * rep
        if width != size:
            return None
        parts.append(part)
    return parts if not segs else None


def _group_norm_reps(gm: fx.GraphModule, mods) -> Dict[fx.Node, int]:
    """{conv node: channels per GroupNorm group} for convs whose output a GroupNorm normalizes
    (through element-wise activations, residual sums and products; then every conv summed with
    or multiplied by them too):
    their output space counts whole groups, each unit `rep` consecutive channels (a diffusion
    U-Net's or a GN-ResNet's blocks; a group of one channel where num_groups is the channel
    count). A conv claimed by two group sizes keeps single channels (the graph then keeps what
    does not line up)."""
    def producers(start) -> set:
        found, todo, seen = set(), [start], set()
        while todo:  # back through activations, GroupNorms, sums and products to the convs producing them
            src = todo.pop()
            if not isinstance(src, fx.Node) or src in seen:
                continue
            seen.add(src)
            layer = mods.get(src.target) if src.op == "call_module" else None
            if isinstance(layer, (PASS_MODULES, nn.GroupNorm)) or (src.op == "call_function" and src.target in
                                                                   PASS_FUNCTIONS) or (src.op == "call_method" and
                                                                                        src.target in PASS_METHODS):
                todo.append(src.args[0])
            elif _is_elementwise(src):
                todo += [a for a in src.args if isinstance(a, fx.Node)]
            elif isinstance(layer, CONVS) and layer.groups == 1:
                found.add(src)
        return found

    out: Dict[fx.Node, int] = {}
    clash = set()

    def claim(nodes, per):
        for n in nodes:
            if out.get(n, per) != per:
                clash.add(n)
            out.setdefault(n, per)

    for node in gm.graph.nodes:
        m = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(m, nn.GroupNorm) and m.affine and m.num_groups > 1 and node.args:  # (one group: no unit goes)
            convs = producers(node.args[0])
            if all(mods[n.target].out_channels == m.num_channels for n in convs):
                claim(convs, m.num_channels // m.num_groups)
    for node in gm.graph.nodes:  # a residual sum or a gate: what meets grouped channels is grouped alike
        if _is_elementwise(node):
            convs = producers(node)
            pers = {out[n] for n in convs if n in out}
            if len(pers) == 1:
                claim(convs, pers.pop())
    return {n: r for n, r in out.items() if n not in clash}


def _join(a: List[Tuple[int, int]], b: List[Tuple[int, int]], sp: Spaces, where: str) -> bool:
    """Channel i of segments a with channel i of segments b (a product of two parts), where
    their segments line up; False (nothing joined) where not."""
    if [(sp.get(s).size, r) for s, r in a] != [(sp.get(s).size, r) for s, r in b]:
        return False
    for (sa, _), (sb, _) in zip(a, b):
        sp.union(sa, sb, where)
    return True


def _split_parts(node, xi: Optional[Info], sp: Spaces, mods) -> Optional[List[List[Tuple[int, int]]]]:
    """The segments of each part of a split (or a GLU's halves) along xi's channels, else None."""
    split = _split_args(node, mods)
    return _parts(xi, sp, split[0]) if split is not None and xi is not None and split[1] == xi.cdim else None


def _split_layers(gm: fx.GraphModule, mods) -> Dict[fx.Node, List[int]]:
    """{layer node: part sizes} for linears and convs whose output is split along its channels
    (a linear's through a token fold, as the autograd graph records one on [B, T, C]): `gate,
    up = self.w(x).chunk(2, dim=-1)`, a GLU in one layer (Phi-3's gate_up_proj, ModernBERT's
    Wi), and a conv before nn.GLU(dim=1) (a Conformer's pointwise conv). The layer's output
    then starts as one space per part, which the product joins unit for unit."""
    out: Dict[fx.Node, List[int]] = {}
    for node in gm.graph.nodes:
        args = _split_args(node, mods)
        src = node.args[0] if args is not None and node.args else None
        if not isinstance(src, fx.Node) or _shape(src) is None or len(args[0]) < 2:
            continue
        last = args[1] == len(_shape(src)) - 1
        while (last and src.op == "call_method" and src.target in ("view", "reshape") and _shape(src.args[0])
               and _shape(src.args[0])[-1] == _shape(src)[-1]):
            src = src.args[0]
        m = mods.get(src.target) if src.op == "call_module" else None
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and last and sum(args[0]) == linear_shape(m)[1]:
            out[src] = args[0]
        elif isinstance(m, CONVS) and m.groups == 1 and args[1] == 1 and sum(args[0]) == m.out_channels:
            out[src] = args[0]
    return out


def _elementwise(node, args, info, sp: Spaces, mark) -> None:
    """An addition / product of tensors joins its operands' spaces channel for channel (a Python
    number passes the channels through). Operands it cannot line up (a tensor the graph does
    not follow, such as a learned bias, a layer scale or an embedding's output; channels on
    another dimension; different sizes or concatenations) keep every channel instead: removing
    one on one side only would combine channel i with channel j."""
    tensors = [a for a in args if a in info]
    if not tensors:
        return
    base = info[tensors[0]]
    untracked = [a for a in args if a not in info and not _is_scalar(a)]
    why = None
    if untracked:
        why = f"'{node.name}' combines a tensor the channel graph does not follow ('{untracked[0].name}')"
    for other in tensors[1:]:
        oi = info[other]
        if why is None and (oi.cdim != base.cdim or [r for _, r in oi.segs] != [r for _, r in base.segs]
                            or [sp.get(s).size for s, _ in oi.segs] != [sp.get(s).size for s, _ in base.segs]):
            why = f"'{node.name}' combines tensors whose channels do not line up"
    if why is not None:
        for t in tensors:
            mark(t, why, frozen=True)
    else:
        for other in tensors[1:]:
            for (a, _), (b, _) in zip(base.segs, info[other].segs):
                sp.union(a, b, f"'{node.name}'")
    info[node] = base


def _is_scalar(node) -> bool:
    shape = _shape(node)
    return shape is not None and all(d == 1 for d in shape)


def _const(v) -> bool:
    """Whether an argument is a value known when tracing (not computed from a tensor)."""
    if isinstance(v, (list, tuple)):
        return all(_const(a) for a in v)
    return not isinstance(v, fx.Node)


def _move(node, x, xi: Optional[Info], info, mark) -> None:
    """permute / transpose: the channels follow their dimension to its new place."""
    shp = _shape(x)
    if xi is None or shp is None:
        return
    nd, rest = len(shp), list(node.args[1:]) + list(node.kwargs.values())
    if node.target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        order = [int(d) % nd for d in dims]
        cdim = order.index(xi.cdim) if sorted(order) == list(range(nd)) else None
    else:
        a, b = (int(d) % nd for d in rest[:2]) if len(rest) >= 2 else (None, None)
        cdim = None if a is None else b if xi.cdim == a else a if xi.cdim == b else xi.cdim
    if cdim is None:
        mark(x, f"'{node.name}' moves dimensions in a way the channel graph does not follow")
    else:
        info[node] = Info(xi.segs, cdim)


def _flatten(node, x, xi: Optional[Info], info, start: int, mark, end: int = -1) -> None:
    shp = _shape(x)
    if xi is None or shp is None:
        return
    start, end = start % len(shp), end % len(shp)
    if start == xi.cdim:  # channels become blocks of prod(flattened dims after them) features
        rep = 1
        for d in shp[start + 1:end + 1]:
            rep *= d
        info[node] = Info([(sid, r * rep) for sid, r in xi.segs], start)
    elif start > xi.cdim:
        info[node] = xi
    elif end < xi.cdim:  # dims before the channels merged: the channels move left
        info[node] = Info(xi.segs, xi.cdim - (end - start))
    else:
        mark(x, f"'{node.name}' flattens the channel dimension into the dimensions before it")


def _literal_sizes(node) -> set:
    """The sizes a reshape node names as numbers (`h.reshape(-1, 32)`: a width written into the
    code stays 32 however many channels remain; one read from `h.shape` follows them)."""
    sizes = set()
    if node.meta.get("token_fold"):  # autograd_graph's: sizes as recorded
        return sizes
    for a in (*node.args[1:], *node.kwargs.values()):
        for v in (a if isinstance(a, (tuple, list)) else (a,)):
            if type(v) is int:
                sizes.add(v)
    return sizes


def _reshape(node, x, xi: Optional[Info], info, mark) -> None:
    """view / reshape / squeeze / unsqueeze, read from the shapes before and after: only the
    dimensions after the channels reshaped (`x.view(n, c, -1)`), only those before channels
    that are last (`x.view(-1, c)`: a linear on [B, T, C] tokens folds them), size-1 dimensions
    added or removed (the channels keep their place among the others), or the channels and
    everything after them flattened (`x.view(x.size(0), -1)`)."""
    shp, out = _shape(x), _shape(node)
    if xi is None or shp is None or out is None:
        return
    c = xi.cdim
    if len(out) > c and tuple(out[:c + 1]) == tuple(shp[:c + 1]):  # only the dims after the channels change
        info[node] = xi
    elif c == len(shp) - 1 and out and out[-1] == shp[c] and shp[c] not in _literal_sizes(node):
        info[node] = Info(xi.segs, len(out) - 1)  # channels last, only the dims before them change
    elif [d for d in shp if d != 1] == [d for d in out if d != 1] and shp[c] != 1:
        rank = sum(1 for d in shp[:c] if d != 1)  # the channels' place among the dims other than 1
        info[node] = Info(xi.segs, [i for i, d in enumerate(out) if d != 1][rank])
    elif tuple(out) == tuple(shp[:c]) + (math.prod(shp[c:]),):
        _flatten(node, x, xi, info, c, mark)
    else:
        mark(x, f"'{node.name}' reshapes the channels in a way the channel graph does not follow")
