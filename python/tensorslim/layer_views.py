"""What a verb shows its transform: every layer computing a linear map as the nn.Linear the
recipes select. transformers' Conv1D as the nn.Linear it is (conv1d.py), torch's
nn.MultiheadAttention as its four linears (attention.py), transformers' fused mixture-of-experts
weights as a linear per expert (experts.py), then nn.Linear's equivalent subclasses, that
attention's out_proj among them (linear_subclasses.py). Afterwards each goes
back where the transform left it as it was, and Report rows name the original classes.
"""
from contextlib import contextmanager, nullcontext

from torch import nn

from .attention import attention_unpacked
from .conv1d import conv1d_as_linear, name_conv1d_rows
from .experts import experts_unfused
from .linear_subclasses import name_subclass_rows, subclasses_as_linear
from .report import Report


class LinearViews:
    def __init__(self, conv1d_names: set, attention, experts, subclass_names: dict):
        self.conv1d_names, self.attention, self.experts = conv1d_names, attention, experts
        self.subclass_names = subclass_names
        self.finished = attention is None

    def finish(self, report: Report) -> Report:
        """Inside the `with`, once the transform is done: attentions and experts it left alone go back."""
        self.finished = True
        if self.experts is not None:
            report = self.experts.finish(report)
        return self.attention.finish(report) if self.attention is not None else report

    def name_rows(self, report: Report) -> Report:
        return name_subclass_rows(name_conv1d_rows(report, self.conv1d_names), self.subclass_names)


@contextmanager
def linear_views(model: nn.Module, attention: bool = True, every_token: bool = False):
    """attention=False keeps nn.MultiheadAttention packed and experts fused (ts.prepare_qat:
    training must keep the parameters an optimizer already holds). every_token: the unfused
    experts run every token through every expert while the transform calibrates
    (calibrate_all_experts)."""
    with conv1d_as_linear(model) as conv1d_names, \
            (attention_unpacked(model) if attention else nullcontext()) as unpacked, \
            (experts_unfused(model, every_token) if attention else nullcontext()) as unfused, \
            subclasses_as_linear(model) as subclass_names:
        views = LinearViews(conv1d_names, unpacked, unfused, subclass_names)
        yield views
        if not views.finished:
            raise RuntimeError("linear_views: the transform's report never went through finish()")
