"""A compressed layer's forward errors name the layer: with dozens of layers alike, "x contains
NaN or Inf (row 3)" alone does not say where. The name is the one a verb or ts.load put the
layer in under; it goes into the exception as a note (PEP 678: shown with the traceback,
the message and type unchanged)."""
import contextlib

import torch

NAME_ATTR = "_tensorslim_name"


def name_layer(module: torch.nn.Module, name: str) -> None:
    object.__setattr__(module, NAME_ATTR, name)


def note_layer(module: torch.nn.Module, error: BaseException) -> None:
    name = getattr(module, NAME_ATTR, None)
    note = f"in layer '{name}' ({type(module).__name__})" if name else f"in a {type(module).__name__}"
    if note not in getattr(error, "__notes__", ()):
        error.add_note(note)


@contextlib.contextmanager
def errors_name_layer(module: torch.nn.Module):
    """note_layer on the ValueError / TypeError / IndexError that leaves the block."""
    try:
        yield
    except (ValueError, TypeError, IndexError) as e:
        note_layer(module, e)
        raise
