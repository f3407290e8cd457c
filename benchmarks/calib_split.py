"""Where calibration time goes: block forwards, statistics, search / solve, the rest.

The pipeline's functions are wrapped here, for this run only (nothing in the library pays
for it): every wrapped call adds its *exclusive* time (its own minus that of wrapped calls
inside it) to its stage, so a statistics hook running inside a block forward counts as
statistics, not forward. Forward (pre-)hooks registered while timing are wrapped as statistics
(the pipeline's hooks gather Hessians / Gram matrices; its bookkeeping hooks are cheap).
"rest" is the total minus the three stages: Python bookkeeping, packing, copies, folds.
"""
import contextlib
import time
from collections import defaultdict

import torch
from torch import nn

STAGES = ("forward", "statistics", "solve", "rest")


class StageTimer:
    def __init__(self):
        self.totals = defaultdict(float)
        self._stack = []  # [stage, start, time spent in nested wrapped calls]

    def wrap(self, stage, fn):
        def timed(*args, **kwargs):
            self._stack.append([stage, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                st, start, inner = self._stack.pop()
                spent = time.perf_counter() - start
                self.totals[st] += spent - inner
                if self._stack:
                    self._stack[-1][2] += spent
        timed.__wrapped__ = fn
        return timed


@contextlib.contextmanager
def patched(timer: StageTimer):
    """Wrap the pipeline's forward, statistics and solve functions where they are looked up."""
    from tensorslim.ops import calibration as C
    from tensorslim.quantization import awq, blockwise, gptq

    targets = [
        (blockwise, "run_block", "forward"), (gptq, "run_block", "forward"), (awq, "run_block", "forward"),
        (blockwise, "capture_block_inputs", "forward"),
        (C, "gptq_quantize", "solve"), (C, "awq_search_scale", "solve"), (C, "awq_search_clip", "solve"),
        (C, "quantize_codes_reference", "solve"), (gptq, "fit_float_outputs", "solve"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]
    orig_register = nn.Module.register_forward_hook
    orig_register_pre = nn.Module.register_forward_pre_hook

    def register(self, hook, *args, **kwargs):
        return orig_register(self, timer.wrap("statistics", hook), *args, **kwargs)

    def register_pre(self, hook, *args, **kwargs):
        return orig_register_pre(self, timer.wrap("statistics", hook), *args, **kwargs)

    try:
        for mod, name, stage in targets:
            setattr(mod, name, timer.wrap(stage, getattr(mod, name)))
        nn.Module.register_forward_hook = register
        nn.Module.register_forward_pre_hook = register_pre
        yield timer
    finally:
        nn.Module.register_forward_hook = orig_register
        nn.Module.register_forward_pre_hook = orig_register_pre
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def plain_forward(model, calib, repeats=3) -> float:
    """Best of `repeats` runs of the float model over the calibration data."""
    best = float("inf")
    with torch.no_grad():
        model(calib[0])  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            for x in calib:
                model(x)
            best = min(best, time.perf_counter() - t)
    return best


def calibrate_split(build_model, method: str, group: int, calib):
    """(total seconds, {stage: seconds}) of one ts.quantize INT4 run with `method`."""
    import tensorslim as ts

    model = build_model()
    cfg = ts.Int4WeightOnly(group_size=group, algorithm=method)
    timer = StageTimer()
    with patched(timer):
        start = time.perf_counter()
        ts.quantize(model, cfg, calib_data=calib, progress=False)
        total = time.perf_counter() - start
    split = {s: timer.totals.get(s, 0.0) for s in STAGES[:-1]}
    split["rest"] = total - sum(split.values())
    return total, split


def run_split(build_model, calib, group: int, methods=("gptq", "awq"), repeats: int = 1):
    # The first call of any torch.library custom op in a process imports torch._dynamo (seconds,
    # once): not calibration's cost, so it happens before the clock starts.
    import torch._dynamo  # noqa: F401
    model = build_model()
    fwd = plain_forward(model, calib)
    del model
    tokens = sum(x.numel() for x in calib)
    print(f"\nCalibration time split, {len(calib)} x {calib[0].shape[-1]} tokens ({tokens}), "
          f"torch threads {torch.get_num_threads()}, native threads {__import__('tensorslim')._C.num_threads()}")
    print(f"plain forward over the calibration data: {fwd:.2f} s")
    print(f"{'method':<14} {'total s':>8} {'x fwd':>6} " + " ".join(f"{s + ' s':>13}" for s in STAGES)
          + "   (stage / forward)")
    for method in methods:
        for _ in range(repeats):
            total, split = calibrate_split(build_model, method, group, calib)
            parts = " ".join(f"{split[s]:>6.2f} ({split[s] / fwd:>4.2f})" for s in STAGES)
            print(f"{method + f' int4 g{group}':<14} {total:>8.2f} {total / fwd:>6.2f} {parts}", flush=True)
