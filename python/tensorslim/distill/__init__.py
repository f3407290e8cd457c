"""ts.distill: knowledge distillation inside the user's own training loop.

    loss = ts.distill.kd_loss(student_logits, teacher_logits, temperature=4.0, labels=y, alpha=0.5)
    d = ts.distill.Distiller(student, teacher, losses={"kd": 1.0, "hidden": 0.5},
                             feature_map={"blocks.1": "blocks.3"}, temperature=4.0,
                             example_inputs=(x,))  # measures the widths of the mapped blocks

See docs/distill.md for the formulas, gradients and tolerances.
"""
from .distiller import Distiller, DistillOutput
from .features import HiddenProjection, attention_loss, hidden_loss
from .kd import BACKENDS, REDUCTIONS, kd_loss

__all__ = ["kd_loss", "hidden_loss", "attention_loss", "HiddenProjection", "Distiller", "DistillOutput",
           "REDUCTIONS", "BACKENDS"]
