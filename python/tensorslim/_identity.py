"""What tells a tensor's contents apart between calls, for caches of data derived from a
module's tensors (packed weights, prepared call arguments)."""
from typing import Optional

import torch


def tensor_identity(t: Optional[torch.Tensor]) -> tuple:
    """(storage address, in-place version); () for None. An inference tensor (made under
    torch.inference_mode) has no version counter and cannot change in place outside that
    mode, so its address alone names it; inside the mode it can (load_state_dict there), which
    the layers' forget_derived covers. Checked with is_inference(), not by catching
    _version's error: a C++ exception per tensor per call cost ~30 us."""
    if t is None:
        return ()
    return t.data_ptr(), (-1 if t.is_inference() else t._version)
