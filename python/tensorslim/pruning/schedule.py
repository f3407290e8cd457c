"""Gradual pruning inside a training loop (Zhu & Gupta 2017, "To prune, or not to prune").

    sched = ts.pruning.Schedule(model, ts.Magnitude(sparsity=0.9), start_step=100,
                                end_step=1000, frequency=50)
    for batch in data:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        sched.step()

The target rises from initial_sparsity at start_step to the config's sparsity at end_step:
    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3      (curve="cubic")
pruning fast while many redundant weights remain and slowly near the end; curve="linear"
uses the power 1. Masks are recomputed every `frequency` steps from the current weights;
between updates they hold the pruned weights at zero (see masks.py).

Structured configs (ChannelPrune, `ratio` scheduled the same way) mask whole channels while
training, so the optimizer keeps its parameters; sched.finalize() then removes them
physically. Pass example_inputs= (or calib_data=) for models traced with torch.fx.
"""
from typing import Optional

from torch import nn

from ..quantization.calibrate import reusable
from ..report import Report, compressed_layers, note_already_compressed, warn_if_nothing_changed
from .config import _Unstructured
from .masks import accept_saved_masks

CURVES = {"cubic": 3, "linear": 1}



class Schedule:
    def __init__(self, model: nn.Module, config, start_step: int, end_step: int, frequency: int,
                 curve: str = "cubic", initial_sparsity: float = 0.0, *, calib_data=None,
                 forward_loop=None, example_inputs=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Schedule: expected a torch.nn.Module, got {type(model).__name__}")
        for name, v in (("start_step", start_step), ("end_step", end_step), ("frequency", frequency)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"Schedule: {name} must be an int, got {v!r}")
        if not 0 <= start_step < end_step:
            raise ValueError(f"Schedule: need 0 <= start_step < end_step, got {start_step}, {end_step}")
        if frequency < 1:
            raise ValueError(f"Schedule: frequency must be >= 1, got {frequency}")
        if curve not in CURVES:
            raise ValueError(f"Schedule: curve must be one of {sorted(CURVES)}, got {curve!r}")
        if getattr(config, "compensate", False):
            raise ValueError("Schedule: ChannelPrune(compensate=True) is for one-shot ts.prune; under a schedule "
                             "the training between steps adapts the biases itself")
        self.final = self._final(config)
        if not 0.0 <= initial_sparsity <= self.final:
            raise ValueError(f"Schedule: initial_sparsity must be in [0, {self.final}], got {initial_sparsity}")
        self.model, self.config = model, config
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.curve, self.initial_sparsity = curve, float(initial_sparsity)
        # structured configs: tracing inputs / taylor data, and the channels masked last
        self.calib_data, self.forward_loop, self.example_inputs = reusable(calib_data), forward_loop, example_inputs
        self.chosen: dict = {}
        self.finalized = False
        self.step_count = 0
        self.current: float = 0.0  # the sparsity (or channel ratio) applied last
        self.last_report: Optional[Report] = None
        # resuming: a fresh model takes the checkpoint's masks in model.load_state_dict
        accept_saved_masks(model)

    @staticmethod
    def _final(config) -> float:
        if isinstance(config, _Unstructured):
            return float(config.sparsity)
        if getattr(config, "ratio", None) is None:
            raise TypeError(f"Schedule: expected a pruning config, got {type(config).__name__}")
        from .channels import scheduled_final

        return scheduled_final(config)

    def target(self, step: int) -> float:
        """The scheduled sparsity at `step` (0 before start_step, final after end_step)."""
        if step < self.start_step:
            return 0.0
        frac = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return self.final + (self.initial_sparsity - self.final) * (1.0 - frac) ** CURVES[self.curve]

    def due(self, step: int) -> bool:
        return (self.start_step <= step <= self.end_step
                and ((step - self.start_step) % self.frequency == 0 or step == self.end_step))

    def step(self) -> Optional[Report]:
        """Call once per training step, after optimizer.step(). Returns the Report when it
        pruned at this step, else None."""
        self.step_count += 1
        if not self.due(self.step_count):
            return None
        s = self.target(self.step_count)
        if s <= self.current:  # nothing new to prune (the curve's start, or a repeated end)
            return None
        self.last_report = self._apply(s)
        self.current = s
        return self.last_report

    def _apply(self, s: float) -> Report:
        before = compressed_layers(self.model)  # rows saying why they stay as they are
        report = note_already_compressed(self._prune(s), before)
        return warn_if_nothing_changed(report, f"Schedule.step (step {self.step_count})")

    def _prune(self, s: float) -> Report:
        if isinstance(self.config, _Unstructured):
            from .unstructured import prune_unstructured

            return prune_unstructured(self.model, self.config, sparsity=s, progress=False)
        from .channels import soft_prune_channels

        chosen: dict = {}
        report = soft_prune_channels(self.model, self.config, s, self.calib_data, self.forward_loop,
                                     self.example_inputs, chosen=chosen)
        self.chosen = chosen
        return report

    def finalize(self) -> Report:
        """End of training: bake the masks in; for a structured config, physically remove the
        channels masked last (the model computes the same, with smaller layers)."""
        from .masks import MASK, attach, finalize, masked_layers

        if isinstance(self.config, _Unstructured):
            finalize(self.model)
            return Report()
        if self.finalized:  # the same channel indices again would remove as many other channels
            raise ValueError("Schedule.finalize: already called; the masked channels are removed")
        from .channels import prune_channels

        masked = {n: (m, getattr(m, MASK).clone()) for n, m in masked_layers(self.model).items()}
        finalize(self.model)
        try:
            report = prune_channels(self.model, self.config, self.calib_data, None, self.example_inputs,
                                    forced=self.chosen)
        except BaseException:  # the model is as it was: masked, and the masks keep training it so
            for mod, keep in masked.values():
                attach(mod, keep, zero=False)
            raise
        self.finalized = True
        return report

    def state_dict(self) -> dict:
        """Where the run is. The masks are in the model's state_dict: resume by building the
        model, optimizer and Schedule, then loading the three states (in any order)."""
        return {"step_count": self.step_count, "current": self.current, "finalized": self.finalized,
                "chosen": {k: list(v) for k, v in self.chosen.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.current = int(state["step_count"]), float(state["current"])
        self.finalized = bool(state.get("finalized", False))
        # the channels masked last, which finalize() removes (absent in older states)
        self.chosen = {k: [int(i) for i in v] for k, v in state.get("chosen", {}).items()}
