"""Warnings that point at the user's line: the first frame outside tensorslim and torch (a fixed
stacklevel lands inside the library when the call comes through a schedule, a recipe or a
module hook)."""
import os
import sys
import warnings

import torch

_INSIDE = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def warn_user(message: str, category=UserWarning) -> None:
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1 if frame is not None else 2)
