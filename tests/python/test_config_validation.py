"""Every config field is type-checked at construction: a wrong type is an error naming the
class, the field, the value and what was expected (strings are not booleans, floats are not
group sizes), include / exclude take one pattern or a list, and JSON round trips still work."""
import dataclasses
import typing

import numpy as np
import pytest
import torch
from torch import nn

import tensorslim as ts
import tensorslim.config as C


def _config_classes():
    found, todo = set(), [ts.Config]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if not sub.__name__.startswith("_"):
                found.add(sub)
    return sorted(found, key=lambda c: c.__name__)


CLASSES = _config_classes()


def test_every_public_config_class_is_registered_and_exported():
    assert {c.__name__ for c in CLASSES} == set(C._CONFIG_TYPES)
    assert all(getattr(ts, c.__name__) is c for c in CLASSES)


def _wrong_values(name: str, kind) -> list:
    """Values of the wrong type for a field annotated `kind`."""
    optional = type(None) in typing.get_args(kind)
    arms = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    if name in ("include", "exclude"):
        return [3, ["a.*", 3], None, {"a": 1}]
    if name == "filter_fn":
        return [3, "fc1"]
    if arms == [bool]:
        return ["false", "no", "True", 0, 1, None, 1.0]
    if arms == [int]:
        return [128.0, "128", True] + ([] if optional else [None])
    if arms == [float]:
        return ["0.5", True, [0.5]] + ([] if optional else [None])
    if arms == [str]:
        return [1, True, b"auto"] + ([] if optional else [None])
    if set(arms) == {float, str}:
        return [True, None, [0.5]]
    if int in arms and any(typing.get_origin(a) is tuple for a in arms):  # e.g. Tucker ranks
        return ["8", 8.0, True, (8,), (8, "4"), [8.0, 4], (8, 4, 2)]
    raise AssertionError(f"{name}: no wrong values for annotation {kind}")


CASES = [pytest.param(cls, f.name, bad, id=f"{cls.__name__}.{f.name}={bad!r}")
         for cls in CLASSES
         for f in dataclasses.fields(cls)
         for bad in _wrong_values(f.name, typing.get_type_hints(cls)[f.name])]


@pytest.mark.parametrize("cls,name,bad", CASES)
def test_wrong_type_is_rejected_naming_class_field_and_value(cls, name, bad):
    with pytest.raises(TypeError) as info:
        cls(**{name: bad})
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}: {name} must be ") and repr(bad) in msg
    assert isinstance(info.value, ValueError)  # caught as either, as before


def test_strings_never_read_as_booleans():
    for make in (lambda: ts.Int4WeightOnly(symmetric="false"), lambda: ts.Binary(activations="no"),
                 lambda: ts.W8A8(smoothquant="false"), lambda: ts.Int8Dynamic(fold="0"),
                 lambda: ts.GPTQ(act_order="no"), lambda: ts.W4A8(symmetric="False"),
                 lambda: ts.Int8WeightOnly(skip_output_head="no")):
        with pytest.raises(TypeError, match="must be True or False"):
            make()


def test_include_string_is_one_pattern():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 64))
    model.add_module("fc2", nn.Linear(64, 64))
    model.add_module("out", nn.Linear(64, 8))
    cfg = ts.Int8WeightOnly(include="fc1*", exclude="out")
    assert cfg.include == ("fc1*",) and cfg.exclude == ("out",)
    report = ts.quantize(model, cfg, progress=False)
    assert [c.name for c in report.changed] == ["fc1"]
    assert isinstance(model.fc2, nn.Linear) and isinstance(model.out, nn.Linear)
    assert ts.Int8WeightOnly(include=["a", "b"]).include == ("a", "b")


def test_group_size_float_is_rejected_at_construction():
    with pytest.raises(TypeError, match=r"Int4WeightOnly: group_size must be an int or None, got 128.0 \(float\)"):
        ts.Int4WeightOnly(group_size=128.0)
    with pytest.raises(TypeError, match="group_size"):
        ts.W4A8(group_size=64.0)


def test_accepted_values_are_normalized():
    assert type(ts.Int4WeightOnly(group_size=np.int64(64)).group_size) is int
    assert ts.GPTQ(damp=0).damp == 0 and ts.W8A8(percentile=99).percentile == 99  # ints in float fields
    assert ts.W8A8(smoothquant_alpha=1).smoothquant_alpha == 1
    assert ts.W8A8(smoothquant_alpha="auto").smoothquant_alpha == "auto"
    fn = lambda name, mod: True  # noqa: E731
    assert ts.Binary(filter_fn=fn).filter_fn is fn


def test_range_checks_stay_with_each_config():
    with pytest.raises(ValueError, match="group_size must be None"):
        ts.Int4WeightOnly(group_size=100)
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        ts.W8A8(smoothquant_alpha=1.5)
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        ts.W8A8(smoothquant_alpha="always")
    with pytest.raises(ValueError, match="damp"):
        ts.GPTQ(damp=float("nan"))
    for cls in (ts.W8A8, ts.Int8Dynamic):
        for bad in (0, 128, -64):
            with pytest.raises(ValueError, match=f"{cls.__name__}: weight_qmax must be an int in"):
                cls(weight_qmax=bad)
        for bad in (64.0, True):
            with pytest.raises((TypeError, ValueError), match=f"{cls.__name__}: weight_qmax must be an int or None"):
                cls(weight_qmax=bad)
        assert cls().weight_qmax is None and cls(weight_qmax=64).weight_qmax == 64  # None: this CPU's choice
        assert type(cls.from_dict(cls().to_dict())) is cls


UNREACHED_CLASSES = [c for c in CLASSES if "unreached" in {f.name for f in dataclasses.fields(c)}]


def test_unreached_on_every_calibrating_config():
    """Every config whose technique calibrates says what becomes of a layer its data never runs,
    and whether a mixture-of-experts block's experts each calibrate on every token."""
    assert {c.__name__ for c in UNREACHED_CLASSES} == {"AWQ", "GPTQ", "Int4WeightOnly", "IntWeightOnly", "W8A8",
                                                       "Int8Dynamic", "NM", "Unstructured", "SVD"}
    assert UNREACHED_CLASSES == [c for c in CLASSES if "calibrate_all_experts" in {f.name for f in dataclasses.fields(c)}]
    for cls in UNREACHED_CLASSES:
        extra = REQUIRED.get(cls.__name__, {})
        assert cls(**extra).unreached == "fallback" and cls(**extra).calibrate_all_experts is False
        for mode in C.UNREACHED:
            assert ts.Config.from_json(cls(unreached=mode, **extra).to_json()).unreached == mode
        with pytest.raises(ValueError, match=rf"{cls.__name__}: unreached must be one of \('fallback', 'skip', "
                                             rf"'error'\), got 'raise'"):
            cls(unreached="raise", **extra)


def test_gptq_block_size_is_bounded_at_construction():
    assert ts.GPTQ(block_size=C.GPTQ_MAX_BLOCK_SIZE).block_size == 1 << 16
    for bad in (0, -1, C.GPTQ_MAX_BLOCK_SIZE + 1, 1 << 40):
        with pytest.raises(ValueError, match=r"GPTQ: block_size must be in \[1, 65536\]"):
            ts.GPTQ(block_size=bad)


# Configs that need one of several arguments to be valid at all.
REQUIRED = {"SVD": {"energy": 0.9}, "Tucker": {"energy": 0.9}}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_json_round_trip_of_every_config(cls):
    cfg = cls(include="blocks.*", exclude=["head", "pooler.*"], **REQUIRED.get(cls.__name__, {}))
    back = ts.Config.from_json(cfg.to_json())
    assert back == cfg and type(back) is cls and back.include == ("blocks.*",)


def test_json_with_wrong_types_is_rejected():
    with pytest.raises(TypeError, match="Binary: activations must be True or False, got 'yes'"):
        ts.Config.from_dict({"type": "Binary", "activations": "yes"})
    with pytest.raises(TypeError, match="NVFP4: include"):
        ts.Config.from_dict({"type": "NVFP4", "include": [1, 2]})


def test_version_seed_and_from_dict_class_are_checked():
    with pytest.raises(ValueError, match="config version must be >= 1"):
        ts.Int8WeightOnly(version=0)
    for cls in (ts.RandomPrune, ts.ChannelPrune):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            cls(seed=2 ** 70)
    d = ts.Int4WeightOnly(group_size=32).to_dict()
    with pytest.raises(ValueError, match="holds a Int4WeightOnly, not a Int8WeightOnly"):
        ts.Int8WeightOnly.from_dict(d)
    assert ts.Int4WeightOnly.from_dict(d) == ts.config.Config.from_dict(d) == ts.Int4WeightOnly(group_size=32)
    assert ts.config.Config.from_json(ts.NM(2, 4).to_json()) == ts.NM(2, 4)
