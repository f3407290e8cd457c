from ._native import _C  # noqa: F401
