"""INT8 convolutions and matmuls run by the oneDNN that torch ships (torch.ops.onednn), on
torch's own OpenMP threads.

Why there are two: the onednn wheel tensorslim links runs each kernel on a TBB worker behind
a SYCL CPU queue (the calling thread waits), while torch's OpenMP workers keep spinning for
milliseconds after every parallel region (torch's ops and our activation quantizer alike).
On a machine with few cores the spinning worker holds the core that TBB worker needs: perf on
a 2-core Zen 4 showed libgomp spinning in 48% of the samples while one TBB worker ran every
conv. torch's oneDNN runs the same kernels (the same bits: same u8 x s8 products, scales and
epilogue) on the OpenMP team itself, so the threads that would spin do the work.

Int8Conv2d takes this route in eager CPU calls large enough to gain (`pays`) whose epilogue
is one torch's op has (no residual: none / ReLU / ReLU6 / SiLU; with a residual: none / ReLU);
Int8Linear (uint8 codes) from the rows where our dispatch would hand the product to oneDNN, or
fewer for large weights (`linear_pays`), except where the layer holds our panels (VNNI ones on
AVX-512 VNNI CPUs without AMX, AVX2 ones on AVX2 CPUs without VNNI), which beat this matmul at
every size measured there or nearly (AVX2 from 640 rows: 0.92-1.10x).
Everything else runs our kernels. TENSORSLIM_TORCH_ONEDNN=0 turns the route off (A/B runs,
tests). The activations are always quantized by our quantizers.
"""
import functools
import math
import os
import threading
from typing import List, Optional

import torch

from .. import _views
from .._native import _C
from .int8 import INT8_BACKENDS, packed_layout, packs_own_panels, quantize_per_token, quantize_static

# activation -> (torch's unary post-op name, its scalars)
_UNARY = {"": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]), "silu": ("swish", [])}
_enabled = os.environ.get("TENSORSLIM_TORCH_ONEDNN", "1") != "0"
_ops_present: Optional[bool] = None
_OPS = ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise")


class PackedCache(dict):
    """Weights reordered for torch's kernels (opaque tensors that cannot be copied or pickled):
    a copied or unpickled module starts with an empty cache and packs again."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()


def set_enabled(flag: bool) -> bool:
    """Turns the route on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def available() -> bool:
    """Whether the route may be taken: switched on, and this torch's ops exist and compute what
    we expect (checked once on tiny cases, so a torch whose private ops changed signature or
    meaning leaves every layer on our kernels instead of failing)."""
    global _ops_present
    if _ops_present is None:
        try:
            _ops_present = (torch.backends.mkldnn.is_available()
                            and all(hasattr(torch.ops.onednn, op) for op in _OPS) and _probe())
        except (AttributeError, RuntimeError, TypeError, ValueError):
            _ops_present = False
    return _enabled and _ops_present


def _probe() -> bool:
    """A 3x3 conv with a residual and ReLU (our call, conv2d_quantizing's path), and a matmul as
    per-token codes take it (zero point 128), on small integers, against their exact values."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 128, (1, 3, 3, 4), generator=g, dtype=torch.uint8)
    w = torch.randint(-8, 9, (4, 4, 3, 3), generator=g).to(torch.int8)
    ones, zeros = torch.ones(4), torch.zeros(4, dtype=torch.long)
    residual = torch.randn(1, 4, 3, 3, generator=g)
    with torch.inference_mode():
        packed = prepack(w, ones, 0.5, 3, [1, 1], [1, 1], [1, 1], 1, [1, 4, 3, 3])
        got = _conv(codes.movedim(-1, 1), 0.5, 3, packed, ones, None, ([1, 1], [1, 1], [1, 1], 1), residual,
                    "relu")
        acc = torch.nn.functional.conv2d(codes.movedim(-1, 1).double() - 3, w.double(), padding=1)
        conv_ok = torch.equal(got, (acc.float() * 0.5 + residual).relu())
        x = torch.randint(0, 256, (2, 8), generator=g, dtype=torch.uint8)
        wl = torch.randint(-8, 9, (4, 8), generator=g).to(torch.int8)
        y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, linear_prepack(wl), ones, zeros, None, 1.0, 0,
                                               torch.float32, "none", [], "")
        linear_ok = torch.equal(y, ((x.double() - 128) @ wl.double().T).float())
    return conv_ok and linear_ok


# Below this much work a call is quicker through our one native call (torch's route adds ~15 us
# of op calls); measured per layer of the digits ResNet on a 2-core Zen 4: torch's route 12-20%
# slower at batch 1 (0.3-2.4M multiply-adds, 2K-8K outputs), even at batch 4, 2-18% faster
# from batch 8 (1 x 1 convs and the 1-channel stem: by output size, 64K outputs and up).
# Measured in the whole model, a small conv left on our call among convs on torch's threads
# costs more than alone (the wheel's TBB worker meets torch's spinning OpenMP threads), so
# from batch 8 every conv takes the route: the digits ResNet (random-order rounds, AVX-512 /
# AVX2 capped) 0.80-0.82x the time at batch 8, 0.88-0.91x at 16, 0.94-0.95x at 32; batch 4
# all on our call (routing every conv there was 6% slower).
_MIN_MACS = 1 << 24
_MIN_OUTPUTS = 1 << 17
_MIN_BATCH = 8


def pays(macs: int, outputs: int, batch: int) -> bool:
    """Whether a call of this size runs faster through torch's kernel."""
    return macs >= _MIN_MACS or outputs >= _MIN_OUTPUTS or batch >= _MIN_BATCH


def takes(residual: bool, activation: str) -> bool:
    """Whether this route has the epilogue: torch's fused activations, or a residual add
    followed by nothing or ReLU."""
    return activation in _UNARY and (not residual or activation in ("", "relu"))


def prepack(qweight: torch.Tensor, w_scales: torch.Tensor, act_scale: float, zero_point: int, stride, padding,
            dilation, groups: int, x_shape: List[int]) -> torch.Tensor:
    """qweight reordered for torch's kernel at input shape x_shape ([N, C, H, W]): an opaque
    mkldnn tensor, derived data the module keeps per input shape (never copied or saved)."""
    return torch.ops.onednn.qconv_prepack(qweight, w_scales, float(act_scale), int(zero_point), list(stride),
                                          list(padding), list(dilation), int(groups), list(x_shape))


@functools.lru_cache(maxsize=64)
def _zero_points(n: int) -> torch.Tensor:
    """The weight zero points torch's kernels take: all 0 (our weights are symmetric), one per
    output channel; shared, never written."""
    with torch.inference_mode(False):
        return torch.zeros(n, dtype=torch.long)


_scratch = threading.local()


def _codes_buffer(shape) -> torch.Tensor:
    """A uint8 tensor of `shape` in this thread's buffer, reused across calls (the kernel reads
    it before the call returns): a fresh 25 MB of codes per call (a ResNet 1x1 conv at batch 32)
    cost page faults that made torch's route slower than ours, which also reuses one."""
    n = math.prod(shape)
    buf = getattr(_scratch, "codes", None)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = _scratch.codes = torch.empty(n, dtype=torch.uint8)
    return buf[:n].view(shape)


def conv2d_quantizing(xc: torch.Tensor, act_scale: float, zero_point: int, code_max: int, packed: torch.Tensor,
                      w_scales: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                      residual: Optional[torch.Tensor] = None, activation: str = "") -> torch.Tensor:
    """conv_int8_quantizing's result for 2-D convs, as [N, OC, H, W] (channels-last strides):
    xc [N, H, W, C] fp32 contiguous is quantized by our quantizer (codes min(q, code_max)),
    then convolved by torch's oneDNN. residual: [N, OC, OH, OW] fp32 (any strides), added after
    the conv (see _conv)."""
    return conv2d_from_codes(quantize_input(xc, act_scale, zero_point, code_max), act_scale, zero_point, packed,
                             w_scales, bias, stride, padding, dilation, groups, residual, activation)


def quantize_input(xc: torch.Tensor, act_scale: float, zero_point: int, code_max: int) -> torch.Tensor:
    """Our quantizer's codes of xc [N, H, W, C] fp32 contiguous, min(q, code_max), as an
    [N, C, H, W] view of this thread's codes buffer (valid until the next call here)."""
    codes = _codes_buffer(xc.shape)
    c = xc.shape[-1]
    _C.quantize_static(_views.view(xc.view(-1, c), "x"), None, float(act_scale), int(zero_point),
                       _views.view(codes.view(-1, c), "q"), INT8_BACKENDS["auto"])
    if code_max < 255:
        codes.clamp_(max=code_max)
    return codes.movedim(-1, 1)


def conv2d_from_codes(codes: torch.Tensor, act_scale: float, zero_point: int, packed: torch.Tensor,
                      w_scales: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                      residual: Optional[torch.Tensor] = None, activation: str = "") -> torch.Tensor:
    """The conv of input codes [N, C, H, W] uint8, its epilogue, fp32 out (see _conv)."""
    return _conv(codes, act_scale, zero_point, packed, w_scales, bias,
                 (list(stride), list(padding), list(dilation), int(groups)), residual, activation)


def conv2d_to_codes(codes: torch.Tensor, act_scale: float, zero_point: int, packed: torch.Tensor,
                    w_scales: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                    activation: str, out_scale: float, out_zero_point: int, out_code_max: int) -> torch.Tensor:
    """conv2d_from_codes(...) without residual, handed on as the next conv's input codes
    min(round(y / out_scale) + out_zero_point, out_code_max), uint8 [N, OC, OH, OW]
    (channels-last strides), rounded by torch's kernel in its epilogue: no fp32 output is
    written and read back. oneDNN multiplies by 1 / out_scale where our quantizer divides,
    so a value within an ulp of halfway between two codes may take the other one."""
    unary, scalars = _UNARY[activation]
    out = torch.ops.onednn.qconv2d_pointwise(codes, float(act_scale), int(zero_point), packed, w_scales,
                                             _zero_points(w_scales.numel()), bias, list(stride), list(padding),
                                             list(dilation), int(groups), float(out_scale), int(out_zero_point),
                                             None, unary, scalars, "")
    return out.clamp_(max=out_code_max) if out_code_max < 255 else out


def _conv(qx: torch.Tensor, act_scale: float, zero_point: int, packed: torch.Tensor, w_scales: torch.Tensor,
          bias: Optional[torch.Tensor], geometry: tuple, residual: Optional[torch.Tensor], activation: str
          ) -> torch.Tensor:
    """torch's conv on codes qx [N, C, H, W], then the residual add and ReLU in place.

    Not torch's 'sum' post-op: that adds into the tensor it is given and returns a clone of it,
    so with our copy of the residual it cost two extra passes over the output (digits ResNet
    at batch 32, rounds in random order: 1-8% slower than this). The fp32 sums are the same;
    unlike the post-op's ReLU, which turned a NaN sum into 0, this keeps NaN as the reference."""
    unary, scalars = _UNARY[activation if residual is None else ""]
    y = torch.ops.onednn.qconv2d_pointwise(qx, float(act_scale), int(zero_point), packed, w_scales,
                                           _zero_points(w_scales.numel()), bias, *geometry, 1.0, 0,
                                           torch.float32, unary, scalars, "")
    if residual is None:
        return y
    y.add_(residual)
    return y.relu_() if activation == "relu" else y


# Rows from which linear_int8's automatic choice (src/cpu/gemm_int8.cpp) leaves our VNNI kernels
# for oneDNN (kInt8VnniPanelMaxRows); below it our kernels already run on torch's threads.
LINEAR_MIN_ROWS = 40
# Weights this large (4096 x 4096 and up) take torch's matmul from 16 rows, where our VNNI GEMV
# ends for them (cpu::kInt8VnniLargeMaxRows). Measured on a 2-core Zen 4 (dynamic, interleaved,
# torch's / ours): 4096 x 4096 at 4 rows 1.55, 8-39 rows on our panels 0.96-1.04; 4096 x 11008
# at 4 / 6 rows 1.51 / 1.35, panels 0.97-1.01; 11008 x 4096 at 4 / 6 rows 1.16 / 1.11, panels
# 0.82-0.96; our GEMV at 8 / 16 rows of 4096 x 4096: 0.51-0.61 / 0.79-1.11 ms against torch's
# 0.89 / 1.28. (Before our kernels' vpdpbusd stopped copying accumulators: 0.66-0.76 at 4-32
# rows, hence 4 then.) Small weights keep our panels below LINEAR_MIN_ROWS (MiniLM's 384 x 1536
# at 32 rows: 1.74).
LARGE_WEIGHT = 1 << 24
LARGE_WEIGHT_MIN_ROWS = 16


@functools.lru_cache(maxsize=None)
def _matmul_exact(K: int, N: int) -> bool:
    """Whether oneDNN's u8 x s8 matmul of this shape is exact on this CPU (VNNI or AMX: our
    dispatch's test, gemm_int8_onednn.cpp); without, our AVX2 kernels keep the product. The
    packed layout says it: oneDNN's where exact, or our VNNI panels on VNNI CPUs (our AVX2
    panels or none elsewhere)."""
    return packed_layout(K, N) in ("vnni_panels", "onednn")


def linear_pays(rows: int, K: int, N: int) -> bool:
    """Whether Int8Linear should take torch's matmul for this many rows of this shape: from
    LINEAR_MIN_ROWS rows (LARGE_WEIGHT_MIN_ROWS for a LARGE_WEIGHT) and _MIN_MACS multiply-adds,
    where that matmul is exact (CPUs with VNNI or AMX). Never where pack_int8_weight writes our
    panels (ops.int8.packs_own_panels), which on AVX2 CPUs without VNNI it always does (there
    torch's kernels add pairs of u8 x s8 products in saturating int16; the route took codes in
    [-64, 64], exact there, until our AVX2 panels ran them faster). VNNI panels on a 2-core
    Zen 4, layer against this route (dynamic, 1-640 rows): 384 x 384 2.68-1.07x, 384 x 1536 /
    1536 x 384 2.53-1.05x, 4096 x 4096 2.14-1.08x, 4096 x 11008 2.11-1.10x (docs/benchmarks.md,
    eighteenth session). AVX2 panels (narrow codes, AVX2 caps): 1.0-1.84x at 40-128 rows, 0.92-
    1.10x at 640-1792 (twentieth session); the route's 3-8% there is not worth the third copy
    of the weight it would pack beside qweight and the panels.
    Measured on a 2-core Zen 4 after a torch op (dynamic, torch's / the wheel's time): 384 x 384
    at 56-128 rows 1.06-1.08 (the wheel wins; under _MIN_MACS), 256 rows 0.97, 1024 rows 0.61;
    384 x 1536 at 40-80 rows 1.00-1.04, 128-1024 rows 0.59-0.64; 1536 x 384 0.63-0.75 from 40
    rows."""
    min_rows = LARGE_WEIGHT_MIN_ROWS if K * N >= LARGE_WEIGHT else LINEAR_MIN_ROWS
    if not (rows >= min_rows and rows * K * N >= _MIN_MACS and available()) or packs_own_panels(K, N):
        return False
    return _matmul_exact(K, N)


def default_weight_qmax(K: int, N: int) -> int:
    """The configs' weight_qmax=None for a [N, K] linear on this CPU: 64 where the layer will
    hold our AVX2 panels without vpdpbusd (AVX2 CPUs whose oneDNN INT8 matmul is inexact, no
    VNNI / AMX), which multiply codes in [-64, 64] without the sign product full-range codes
    need (1.6-2.9x at 4096 x 4096, docs/benchmarks.md, twentieth session); else 127 (AVX-VNNI's
    vpdpbusd takes any codes at one speed). The route's on / off switch is not read: it is for
    A/B runs and must not change what a model quantizes to."""
    return 64 if packed_layout(K, N) == "avx2_panels" and _C.avx2_vnni() == "none" else 127


def linear_prepack(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [N, K] int8 reordered for torch's matmul (opaque, kept in a PackedCache)."""
    return torch.ops.onednn.qlinear_prepack(qweight, None)


def linear_w8a8(x2: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
                inv_smooth: Optional[torch.Tensor], act_scale: Optional[float] = None,
                act_zero_point: int = 0) -> torch.Tensor:
    """ops.linear_w8a8's product for x2 [M, K] fp32 with uint8 codes, as [M, N] fp32: static
    (act_scale) or per-token codes (zero point 128; torch's kernel takes one source scale,
    so the per-row scales multiply its output, then the bias is added)."""
    args = (w_scales, _zero_points(w_scales.numel()))
    if act_scale is not None:
        qx = quantize_static(x2, act_scale, act_zero_point, inv_smooth, torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, float(act_scale), int(act_zero_point), packed, *args, bias,
                                                  1.0, 0, torch.float32, "none", [], "")
    qx, token_scales = quantize_per_token(x2, inv_smooth, unsigned=True)
    y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed, *args, None, 1.0, 0, torch.float32, "none", [], "")
    return torch.addcmul(bias, y, token_scales[:, None]) if bias is not None else y.mul_(token_scales[:, None])
