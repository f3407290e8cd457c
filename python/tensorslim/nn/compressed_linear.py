"""What every compressed linear does around its kernel: check the input, and let a gradient
flow through the frozen layer to its input.

The packed buffers are frozen: they never receive a gradient. The input does (and a bias the
user makes trainable: requires_grad_ on the buffer, or re-set as a Parameter), so an adapter
(LoRA) or any trainable layer before a quantized one trains as on a float base model:
    grad_x = grad_y @ W_eff
with W_eff the layer's effective weight (`effective_weight()`, the dequantized weight with any
input scaling folded in). Activation quantization (W8A8, int8 dynamic, W4A8, XNOR) is passed
straight through: its rounding is treated as the identity, as quantization-aware training and
adapter training on quantized models do, because the true derivative of a rounding is zero
almost everywhere. W_eff is dequantized when backward runs (not kept from the forward), so
inference and no_grad calls pay nothing for this.
"""
import torch
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from .compute_dtype import COMPUTE_DTYPES, KeepsPackedDtypes, held_bias, kernel_bias
from .lazy_weight import lazy_weight
from .layer_errors import note_layer


def _device(module: torch.nn.Module) -> torch.device:
    return next((b.device for b in module.buffers()), torch.device("cpu"))


def owned_output(y: torch.Tensor) -> torch.Tensor:
    """A kernel's output as a tensor of its own: the kernels hand back a reshaped view of the
    product they wrote, and autograd refuses in-place ops (nn.ReLU(inplace=True), masked
    writes) on a view a custom Function returned. Only the autograd path pays for the copy."""
    return y.clone() if y._base is not None else y


class _FrozenLinearFunction(torch.autograd.Function):
    """Forward: the layer's own kernel; backward: grad_y @ W_eff to the input, and grad_y
    summed over the rows to a bias made trainable (BitFit-style tuning of a compressed model);
    forward mode (jvp): the same linear map on the tangents. forward / setup_context apart and
    a generated vmap rule, so torch.func's transforms (grad, jacrev, jacfwd, vmap) take it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, bias, layer):
        return owned_output(layer.kernel_forward(x))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, layer = inputs
        ctx.layer, ctx.x_dtype, ctx.out_dtype, ctx.out_shape = layer, x.dtype, output.dtype, output.shape
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        dtype = torch.promote_types(grad_y.dtype, torch.float32)  # bf16 / fp16 grads: fp32 product
        if ctx.needs_input_grad[0]:
            w = ctx.layer.effective_weight()
            grad_x = (grad_y.to(dtype) @ w.to(device=grad_y.device, dtype=dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None

    @staticmethod
    def jvp(ctx, x_t, bias_t, _):
        out_t = None
        if x_t is not None:
            w = ctx.layer.effective_weight()
            dtype = torch.promote_types(x_t.dtype, torch.float32)
            out_t = x_t.to(dtype) @ w.to(device=x_t.device, dtype=dtype).T
        if bias_t is not None:
            out_t = bias_t.float().expand(ctx.out_shape) if out_t is None else out_t + bias_t
        return out_t.to(ctx.out_dtype)


def needs_function(x: torch.Tensor, bias) -> bool:
    """Whether a call must go through the layer's autograd.Function: a gradient to record (the
    input's, or a trainable bias's), a forward-mode dual level, or a torch.func transform."""
    return ((x.requires_grad and torch.is_grad_enabled()) or bias is not None
            or forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None)


def trainable_bias(layer: torch.nn.Module):
    """The layer's bias where a gradient must reach it (made trainable, grad mode on), else None."""
    if not torch.is_grad_enabled():  # first: inference pays one call
        return None
    bias = held_bias(layer)
    return bias if bias is not None and bias.requires_grad else None


class CompressedLinear(KeepsPackedDtypes):
    """Base of the compressed linears. A subclass keeps in_features / out_features and
    implements kernel_forward(x) (the packed kernel) and dequantized_weight().

    Inputs: a float32 / bfloat16 / float16 tensor of shape [..., in_features] (0 rows give an
    empty output); a 0-D tensor or another last dimension is a ValueError, an integer or
    float64 tensor a TypeError,
    each naming the layer kind and the expected shape. NaN / Inf inputs propagate to the
    rows holding them (as in F.linear) for weight-only kinds; kinds that quantize
    activations need finite values and raise a ValueError.

    The nn.Linear surface: in_features, out_features, a read-only `.weight` (the effective
    weight [out, in], computed on each access, in the compute dtype, on the module's device)
    and `.bias` in the compute dtype (compute_dtype.BiasInComputeDtype: F.linear(x, layer.weight,
    layer.bias) in model code runs in a half model too).

    Compute dtype: float32 until `.half()` / `.bfloat16()` / `.to(dtype)` changes it (a layer
    that replaced an fp16 / bf16 one, by a verb or a load, computes in that dtype); then
    inputs are cast to it and outputs come in it, while the packed codes, scales and bias keep
    the dtypes the kernels need. Any other dtype (float64) raises a TypeError right there.
    """

    in_features: int
    out_features: int

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """The float [out, in] weight the layer applies to its input (what backward uses)."""
        return self.dequantized_weight()

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight [out, in] (dequantized, input scaling or smoothing undone), a
        fresh tensor on each access: code that reads nn.Linear's weight (dtype, device, shape,
        values) keeps working; reading only its shape, dtype or device dequantizes nothing
        (lazy_weight.py). Read-only: the packed buffers are the layer's state."""
        dtype, device = self.compute_dtype, _device(self)  # as of this read
        return lazy_weight(lambda: self.effective_weight().detach().to(device=device, dtype=dtype),
                           (self.out_features, self.in_features), dtype, device)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise AttributeError(f"{type(self).__name__}.weight is read-only (the dequantized weight, computed "
                                 f"from the packed buffers); quantize a float layer again to change it")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name == "weight":
            raise AttributeError(f"{type(self).__name__}.weight is read-only and cannot be deleted")
        super().__delattr__(name)

    def check_input(self, x) -> None:
        kind = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{kind}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{kind}: expected last dimension {self.in_features} (an input of shape "
                             f"[..., in_features={self.in_features}]), got shape {tuple(x.shape)}")
        if x.dtype not in COMPUTE_DTYPES:  # float64 too: computed in fp32 it fooled gradcheck
            raise TypeError(f"{kind}: expected a float input (float32, bfloat16 or float16), got {x.dtype}")

    def forget_derived(self) -> None:
        """Drops what the layer derived from its buffers (packed copies, prepared call
        arguments); the next call rebuilds it. Those caches notice new buffer contents by
        address and in-place version, but an inference tensor rewritten in place under
        torch.inference_mode keeps both: loading a state dict (load_state_dict, ts.load) calls
        this, and so must code that edits such buffers in place there."""

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.forget_derived()

    def packed_tensors(self, *names: str):
        """The named buffers, read from _buffers (nn.Module.__getattr__ costs ~2 us a tensor,
        paid per layer call); None if one is no longer a buffer (re-set as a parameter)."""
        b = self._buffers
        if not all(n in b for n in names):
            return None
        return [b[n] if n != "bias" else kernel_bias(b[n]) for n in names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(x)
        except (ValueError, TypeError) as e:
            note_layer(self, e)
            raise

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self._compute_dtype is not None and x.dtype != self._compute_dtype:
            x = x.to(self._compute_dtype)
        bias = trainable_bias(self)
        if needs_function(x, bias):
            return _FrozenLinearFunction.apply(x, bias, self)
        return self.kernel_forward(x)
