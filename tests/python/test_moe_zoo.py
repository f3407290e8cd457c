"""Every experts class of transformers' `use_experts_implementation` in the installed version,
built from its model's default config shrunk to a few experts of a few neurons: where
ExpertLinears stands in for it, the unfused module computes what the class's own eager forward
computes on a random top-2 routing over all its experts (the unfusing check itself probes only
the first and last expert), and its INT8 experts reload into a fresh module of the class."""
import importlib
import inspect
import os
import re

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.nn import ExpertLinears

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 24, "expert_intermediate_size": 24,
         "ffn_hidden_size": 48, "moe_ffn_hidden_size": 24, "d_model": 32, "hidden_dim": 32, "num_experts": 6,
         "num_local_experts": 6, "n_routed_experts": 6, "moe_num_experts": 6, "num_experts_per_tok": 2, "top_k": 2,
         "expert_hidden_size": 24, "moe_hidden_size": 24, "expert_dim": 24, "intermediate_dim": 48}
SUBCONFIGS = ("text_config", "thinker_config", "talker_config")


def _configs(cfg):
    return [cfg] + [c for c in (getattr(cfg, a, None) for a in SUBCONFIGS) if c is not None]


def _shrunk(config_cls):
    cfg = config_cls()
    for c in _configs(cfg):
        for k, v in SMALL.items():  # None: a family whose default config has no experts (Gemma 4)
            if hasattr(c, k) and (type(getattr(c, k)) is int or getattr(c, k) is None):
                setattr(c, k, v)
        if hasattr(c, "_experts_implementation"):
            c._experts_implementation = "eager"
    return cfg


def _experts_classes():
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    for family in sorted(os.listdir(root)):
        folder = os.path.join(root, family)
        for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if f.startswith("modeling_") and f.endswith(".py"):
                with open(os.path.join(folder, f)) as src:
                    names = re.findall(r"@use_experts_implementation[^\n]*\nclass (\w+)", src.read())
                if names:
                    yield family, f[:-3], names


def _build(module, name):
    cls = getattr(module, name)
    for config_cls in [getattr(module, n) for n in dir(module) if n.endswith("Config")]:
        if not inspect.isclass(config_cls):
            continue
        try:
            cfg = _shrunk(config_cls)
        except Exception:
            continue
        for c in _configs(cfg):
            for args in ((c,), (c, 0)):  # some take the layer's index too
                try:
                    torch.manual_seed(0)
                    return cls(*args)
                except Exception:
                    continue
    return None


def _zoo():
    """(class name, a built module with random weights, why_not, a builder of a fresh one) of every
    experts class built."""
    for family, file, names in _experts_classes():
        try:
            module = importlib.import_module(f"transformers.models.{family}.{file}")
        except Exception:
            continue  # a model needing an optional package
        for name in names:
            fused = _build(module, name)
            if fused is None or sum(p.numel() for p in fused.parameters()) > 5e6:
                continue
            with torch.no_grad():
                for p in fused.parameters():
                    p.normal_(0.0, 0.3)
            yield name, fused, ExpertLinears.why_not(fused), lambda m=module, n=name: _build(m, n)


class _Routed(nn.Module):
    """A top-2 router in front of an experts module."""

    def __init__(self, experts: nn.Module, hidden: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.router, self.experts = nn.Linear(hidden, experts.num_experts), experts

    def forward(self, x):
        weights, index = torch.softmax(self.router(x), dim=-1).topk(2, dim=-1)
        return self.experts(x, index, weights)


def test_every_unfused_experts_class_reloads_quantized(tmp_path):
    """INT8 experts of every class that unfuses, saved and loaded into a fresh module of the
    class (the file's activation and gate against what the fresh module's own compute)."""
    done = 0
    for name, fused, why, build in _zoo():
        if why is not None:
            continue
        hidden = ExpertLinears.from_experts(fused).hidden_dim
        model = _Routed(fused, hidden)
        ts.quantize(model, ts.Int8WeightOnly(skip_output_head=False), progress=False)
        assert isinstance(model.experts, ExpertLinears), name
        ts.save(model, tmp_path / "zoo.safetensors")
        fresh = ts.load(_Routed(build(), hidden, seed=1), tmp_path / "zoo.safetensors")
        x = torch.randn(5, hidden)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x)), name
        done += 1
    assert done >= 40


def test_every_unfused_experts_class_computes_its_own_forward():
    unfused, left = [], {}
    for name, fused, why, _ in _zoo():
        if why is not None:
            left[name] = why
            continue
        new = ExpertLinears.from_experts(fused)
        g = torch.Generator().manual_seed(1)
        index = torch.stack([torch.randperm(new.num_experts, generator=g)[:2] for _ in range(9)])
        x, weights = torch.randn(9, new.hidden_dim, generator=g), torch.rand(9, 2, generator=g)
        with torch.no_grad():
            want = fused(x, index, weights)
            torch.testing.assert_close(new(x, index, weights), want, rtol=1e-5,
                                       atol=1e-5 * float(want.abs().max()), msg=name)
        unfused.append(name)
    # transformers 5.25: 68 of 73 classes; the families tensorslim's other tests use
    assert len(unfused) >= 40, (unfused, left)
    assert {"MixtralExperts", "GptOssExperts", "Qwen3MoeExperts", "DeepseekV3Experts",
            "Gemma4TextExperts"} <= set(unfused)
