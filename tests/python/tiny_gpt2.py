"""A tiny random GPT-2 (transformers' Conv1D layers: y = x @ W + b, W stored [in, out]) and its
nn.Linear twin, shared by the Conv1D quantization, pruning and sparsity tests."""
import copy

import torch
from torch import nn

VOCAB = 96
BLOCKS = (0, 1)
CONV1D_NAMES = {f"transformer.h.{b}.{n}" for b in BLOCKS
                for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = [torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(s)) for s in (2, 3)]


def tiny_gpt2(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=len(BLOCKS), n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def linear_twin(model: nn.Module) -> nn.Module:
    """The same model with every Conv1D rewritten by hand as nn.Linear (weight W.T)."""
    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, Conv1D):
            lin = nn.Linear(mod.nx, mod.nf)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, lin)
    return out


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)
