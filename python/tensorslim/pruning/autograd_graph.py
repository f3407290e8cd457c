"""The channel graph from the autograd graph, for models torch.fx cannot trace (data-dependent
control flow, unsupported Python): one forward pass on the example inputs records the
operations actually run; they are rewritten as an fx graph of the same vocabulary
(call_module for convs / linears / BatchNorms found by their weights, channel-preserving
functions, add, cat, split, GLU, mean, flatten) so channel_graph.build_spaces reads either alike.
Output shapes come from a backward pre-hook on every node (torch.autograd.grad: no
.grad field is touched). An operation outside that vocabulary stays an opaque call, so
its channels are reported as unsupported, never guessed.
"""
import operator
import sys
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .verify import output_tensors

PASS = {"ReluBackward0", "GeluBackward0", "SiluBackward0", "SigmoidBackward0", "TanhBackward0",
        "HardswishBackward0", "LeakyReluBackward0", "HardtanhBackward0", "HardsigmoidBackward0",
        "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
        "AdaptiveMaxPool2DBackward0", "MaxPool1DWithIndicesBackward0", "CloneBackward0",
        "NativeDropoutBackward0",
        # with a Python number (the *Backward1 overloads: CLIP's quick_gelu `1.702 * x`), x ** p, exp
        "MulBackward1", "AddBackward1", "SubBackward1", "RsubBackward1", "DivBackward1", "PowBackward0",
        "ExpBackward0", "NegBackward0"}
ELEMENTWISE = {"AddBackward0": operator.add, "SubBackward0": operator.sub, "MulBackward0": operator.mul}
MODULE_OPS = {"ConvolutionBackward0": 1, "NativeBatchNormBackward0": 1, "NativeGroupNormBackward0": 1,
              "AddmmBackward0": 2, "MmBackward0": 1}
SPLITS = ("SplitBackward0", "SplitWithSizesBackward0")  # tensor.split / chunk, one node for all parts
# element-wise activations outside transformers' registry (Bloom's: a custom autograd Function)
ELEMENTWISE_CLASSES = {"transformers.models.bloom.modeling_bloom.BloomGelu"}


def _opaque(*args):  # stands for an operation the channel graph does not know
    raise RuntimeError("never called")


def _meta(shape) -> TensorMetadata:
    return TensorMetadata(torch.Size(shape), torch.float32, False, (), torch.contiguous_format, False, {})


def trace(model: nn.Module, example_inputs: tuple, fold_tokens: bool = True) -> fx.GraphModule:
    """fold_tokens: read a view keeping the last dimension (a linear on [B, T, C] folds the
    token dims around its matmul) as keeping the channels; gm.meta["token_folds"] counts them.
    Model code that sizes a reshape from the channel count itself (`C // heads`) fails the
    check with it: channels.py then traces again without."""
    # a weight held by several modules (an output head tied to the embedding) is credited to
    # the one that multiplies by it (a linear / conv), not to the first name listed
    mods = dict(model.named_modules(remove_duplicate=False))
    params: Dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owner = n.rpartition(".")[0]
        if id(p) not in params or isinstance(mods.get(owner), (nn.Linear, nn.modules.conv._ConvNd)):
            params[id(p)] = owner
    from ..quantization.calibrate import eval_mode

    with eval_mode(model):  # each module's own mode comes back (model.train(training) flattened them)
        try:
            inputs = tuple(x.detach().clone().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point()
                           else x for x in example_inputs)
            calls: List = []  # (input, output) grad_fns of activation modules (see _activations)
            act_hooks = [m.register_forward_hook(lambda mod, args, out: calls.append(
                (getattr(args[0], "grad_fn", None) if args else None, getattr(args[0], "output_nr", 0) if args else 0,
                 getattr(out, "grad_fn", None)))) for m in _activations(model)]
            try:
                with torch.enable_grad():
                    out = model(*inputs)
            finally:
                for h in act_hooks:
                    h.remove()
            outs = [o for o in output_tensors(out) if o.grad_fn is not None]
            if not outs:
                raise ValueError("the output does not depend on the inputs through differentiable operations")
            order: List = []
            seen = set()
            stack = [(o.grad_fn, False) for o in outs]
            while stack:  # iterative post-order: inputs before the operations that use them
                fn, done = stack.pop()
                if fn is None or (not done and fn in seen):
                    continue
                if done:
                    order.append(fn)
                    continue
                seen.add(fn)
                stack.append((fn, True))
                stack += [(f, False) for f, _ in fn.next_functions]
            shapes: Dict = {}
            hooks = [fn.register_prehook(lambda g, fn=fn: shapes.__setitem__(fn, tuple(g[0].shape)) if g[0] is not None else None)
                     for fn in order if type(fn).__name__ != "AccumulateGrad"]
            # token ids carry no gradient: embedding tables drive the pass where they enter (only
            # shapes are read; all parameters as leaves took a gradient of each)
            tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
            leaves = ([x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + tables
                      or [p for p in model.parameters() if p.requires_grad])
            # the graph kept: _to_fx reads saved values (a product's scalar operand)
            torch.autograd.grad(sum(o.float().sum() for o in outs), leaves, allow_unused=True, retain_graph=True)
            for h in hooks:
                h.remove()
        except ValueError as e:
            raise ValueError(f"the model traces neither with torch.fx nor through autograd: {e}") from None
        except Exception as e:
            from .channel_graph import first_line

            raise ValueError(f"the model traces neither with torch.fx nor through autograd "
                             f"({first_line(e)})") from None
    return _to_fx(model, order, shapes, params, inputs, outs, fold_tokens, _passes(calls))



def _activations(model: nn.Module) -> List[nn.Module]:
    """Modules of transformers' activation registry (and ELEMENTWISE_CLASSES) without
    parameters or buffers (all act element by element: NewGELU's `0.5 * x * (1.0 + tanh(...))`
    records `1.0 +` with an operand autograd cannot tell from a buffer's, Bloom's GELU is a
    custom Function; each is read whole instead of op by op)."""
    acts = sys.modules.get("transformers.activations")
    classes = tuple({v[0] if isinstance(v, tuple) else v for v in getattr(acts, "ACT2CLS", {}).values()})
    return [m for m in model.modules()
            if ((classes and type(m) in classes and type(m).__module__ == acts.__name__)
                or f"{type(m).__module__}.{type(m).__qualname__}" in ELEMENTWISE_CLASSES)
            and not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())]


def _passes(calls) -> Tuple[Dict, set]:
    """({activation output fn: (input fn, its output index)}, the fns inside those calls): each
    call's recorded operations between its input and output, where they reach nothing else (a
    parameter, a tensor from outside) and number at most 64; other calls are read op by op."""
    passes, inside = {}, set()
    for fin, nr, fout in calls:
        if fin is None or fout is None or fin is fout:
            continue
        seen, todo, ok = set(), [fout], True
        while todo and ok:
            f = todo.pop()
            if f is None or f is fin or f in seen:
                continue
            seen.add(f)
            ok = type(f).__name__ != "AccumulateGrad" and len(seen) <= 64
            todo += [g for g, _ in f.next_functions]
        if ok:
            passes[fout] = (fin, nr)
            inside |= seen - {fout}
    return passes, inside


def _times_a_number(fn, kind: str, ins) -> bool:
    """A product with a one-element tensor the graph does not follow (a Python number wrapped as
    a tensor: `1.702 * x` in CLIP's quick_gelu): channel for channel."""
    if kind != "MulBackward0" or len(ins) != 2 or (ins[0] is None) == (ins[1] is None):
        return False
    other = getattr(fn, "_saved_other" if ins[1] is None else "_saved_self", None)
    return isinstance(other, torch.Tensor) and other.numel() == 1


def _adds_own_bias(fn, kind: str, ins, model: nn.Module, params) -> bool:
    """`x @ W.T + self.bias` (transformers' FalconLinear): the bias of the layer whose product
    is the other operand, sliced with its rows: channel for channel."""
    if kind != "AddBackward0" or len(ins) != 2 or (ins[0] is None) == (ins[1] is None):
        return False
    i = 0 if ins[0] is None else 1
    bias = getattr(fn.next_functions[i][0], "variable", None)
    owner = params.get(id(bias)) if bias is not None else None
    node = ins[1 - i]
    while node.op == "call_method" and node.meta.get("token_fold"):  # the fold back to [B, T, C]
        node = node.args[0]
    return (owner is not None and node.op == "call_module" and node.target == owner
            and getattr(model.get_submodule(owner), "bias", None) is bias)


def _is_transpose_2d(f) -> bool:
    """`W.T` of a matrix (transformers' FalconLinear: x @ self.weight.T) records a permute."""
    return type(f).__name__ == "PermuteBackward0" and tuple(getattr(f, "_saved_dims", ())) == (1, 0)


def _weight_module(fn, index: int, params) -> str:
    f = fn.next_functions[index][0]
    while f is not None and (type(f).__name__ == "TBackward0" or _is_transpose_2d(f)):  # W.t(), x @ W.T
        f = f.next_functions[0][0]
    var = getattr(f, "variable", None)
    return params.get(id(var)) if var is not None else None


def _signed(dim) -> int:
    """A saved dimension: -1 comes back from some backward nodes as 2**64 - 1."""
    dim = int(dim)
    return dim - (1 << 64) if dim >= 1 << 63 else dim


def _split_sizes(fn) -> Tuple[List[int], int]:
    """(part sizes, dim) of a split or chunk the autograd graph recorded (SplitBackward0: equal
    parts, the last one shorter; SplitWithSizesBackward0: the sizes given)."""
    full = tuple(int(d) for d in fn._saved_self_sym_sizes)
    dim = _signed(fn._saved_dim) % len(full)
    if type(fn).__name__ == "SplitWithSizesBackward0":
        return [int(v) for v in fn._saved_split_sizes], dim
    step = int(fn._saved_split_size)
    return [min(step, full[dim] - o) for o in range(0, full[dim], step)], dim


def _to_fx(model, order, shapes, params, inputs, outs, fold_tokens: bool, activations) -> fx.GraphModule:
    g = fx.Graph()
    node_of: Dict = {}
    parts: Dict = {}  # (split function, output index): its getitem node
    folds = 0
    input_ids = {id(x): i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}

    def operand(f, nr):
        """The node of output `nr` of f: the function's own, or its part where f splits."""
        n = node_of.get(f)
        if n is None or n.target is not torch.split:
            return n
        if (f, nr) not in parts:
            sizes, dim = n.args[1], n.args[2]
            parts[(f, nr)] = p = g.call_function(operator.getitem, (n, nr))
            whole = list(n.args[0].meta["tensor_meta"].shape)
            p.meta["tensor_meta"] = _meta(whole[:dim] + [sizes[nr]] + whole[dim + 1:])
        return parts[(f, nr)]

    passes, inside = activations
    for fn in order:
        kind = type(fn).__name__
        if fn in inside:  # an activation's own operations: read whole below
            continue
        if kind == "AccumulateGrad":
            if id(fn.variable) in input_ids:
                n = g.placeholder(f"input_{input_ids[id(fn.variable)]}")
                n.meta["tensor_meta"] = _meta(fn.variable.shape)
                node_of[fn] = n
            continue
        ins = [operand(f, nr) for f, nr in fn.next_functions]
        tensor_ins = [n for n in ins if n is not None]
        name = _weight_module(fn, MODULE_OPS[kind], params) if kind in MODULE_OPS else None
        if fn in passes:  # an element-wise activation module, whole
            src = operand(*passes[fn])
            n = g.call_function(F.relu, (src,)) if src is not None else g.call_function(_opaque, ())
        elif name is not None:
            src = ins[1] if kind == "AddmmBackward0" else ins[0]
            n = g.call_module(name, (src,) if src is not None else ())
        elif (kind in PASS or _times_a_number(fn, kind, ins) or _adds_own_bias(fn, kind, ins, model, params)) and tensor_ins:
            n = g.call_function(F.relu, (tensor_ins[0],))
        elif kind in ELEMENTWISE and tensor_ins:
            # an operand the graph does not follow (a parameter, a buffer, a detached tensor)
            # stays in the operation as an opaque value, so it keeps its channels
            operands = [n if n is not None else g.call_function(_opaque, ()) for n in ins]
            n = g.call_function(ELEMENTWISE[kind], tuple(operands))
        elif kind == "CatBackward0" and len(tensor_ins) == len(ins):
            n = g.call_function(torch.cat, (list(tensor_ins), fn._saved_dim))
        elif kind == "GluBackward0" and tensor_ins:
            n = g.call_function(F.glu, (tensor_ins[0], _signed(fn._saved_dim)))
        elif kind in SPLITS and tensor_ins and "tensor_meta" in tensor_ins[0].meta:
            sizes, dim = _split_sizes(fn)  # a fused GLU's chunk(2): its parts through operand()
            n = g.call_function(torch.split, (tensor_ins[0], sizes, dim))
        elif kind == "MeanBackward1" and tensor_ins:
            n = g.call_method("mean", (tensor_ins[0], list(fn._saved_dim)), {"keepdim": fn._saved_keepdim})
        elif (kind in ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0") and tensor_ins
              and "tensor_meta" in tensor_ins[0].meta):  # (no shape where no gradient reached it)
            src_shape = tuple(tensor_ins[0].meta["tensor_meta"].shape)
            dst = shapes.get(fn)
            start = next((i for i in range(len(src_shape)) if dst is not None and i < len(dst)
                          and dst[:i] == src_shape[:i] and len(dst) == i + 1), None)
            if start is not None:
                n = g.call_function(torch.flatten, (tensor_ins[0], start))
            elif fold_tokens and dst is not None and src_shape and dst[-1] == src_shape[-1]:
                n = g.call_method("reshape", (tensor_ins[0], *dst))  # a linear's token folding
                n.meta["token_fold"] = True  # its sizes are the recorded ones, not numbers in the code
                folds += 1
            else:
                n = g.call_function(_opaque, tuple(tensor_ins))
        else:
            n = g.call_function(_opaque, tuple(tensor_ins))
            n.meta["autograd_op"] = kind
        if fn in shapes and n.target is not torch.split:  # (a split's shape: its first part's)
            n.meta["tensor_meta"] = _meta(shapes[fn])
        node_of[fn] = n
    g.output(tuple(node_of[o.grad_fn] for o in outs if o.grad_fn in node_of))
    gm = fx.GraphModule(model, g)
    gm.meta["token_folds"] = folds
    return gm
