"""WushConfig and the enums: defaults, parsing, validation messages, dict round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wush_compile.config import ActScale, Format, KernelChoice, Method, TransformKind, WushConfig


def test_defaults():
    c = WushConfig()
    assert c.format is Format.MXFP4 and c.group_size == 32
    assert c.method is Method.GPTQ
    assert c.transform is TransformKind.WUSH
    assert c.act_scale is ActScale.STATIC
    assert c.nsamples >= 1 and c.seqlen >= 1
    assert c.damp == 0.01  # SPEC section 2 / 4
    assert c.skip_layers == ()
    assert c.shared_transform is False and c.offload_activations is True
    assert WushConfig(format="nvfp4").group_size == 16


def test_frozen():
    c = WushConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.format = Format.NVFP4  # type: ignore[misc]
    assert c.replace(format="nvfp4").format is Format.NVFP4
    assert c.format is Format.MXFP4


@pytest.mark.parametrize(
    "field,text,enum_value",
    [
        ("format", "nvfp4", Format.NVFP4),
        ("format", "MXFP4", Format.MXFP4),
        ("method", "rtn", Method.RTN),
        ("method", "GPTQ", Method.GPTQ),
        ("transform", "hadamard", TransformKind.HADAMARD),
        ("transform", "Identity", TransformKind.IDENTITY),
        ("transform", "random", TransformKind.RANDOM),
        ("transform", "wus", TransformKind.WUS),
        ("act_scale", "fixed", ActScale.FIXED),
    ],
)
def test_parses_strings(field, text, enum_value):
    c = WushConfig(**{field: text})
    assert getattr(c, field) is enum_value
    assert WushConfig(**{field: enum_value}) == c


def test_enum_parse_errors_list_the_choices():
    with pytest.raises(ValueError, match=r"'fp8'.*'mxfp4', 'nvfp4'"):
        Format.parse("fp8")
    with pytest.raises(ValueError, match="choose one of"):
        KernelChoice.parse(3)
    assert KernelChoice.parse("TRITON_FP8") is KernelChoice.TRITON_FP8
    assert str(Format.NVFP4) == "nvfp4" and f"{Method.RTN}" == "rtn"


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"format": "fp8"}, "fp8"),
        ({"format": None}, "None"),
        ({"method": "awq"}, "awq"),
        ({"transform": "haar"}, "haar"),
        ({"act_scale": "dynamic"}, "dynamic"),
        ({"nsamples": 0}, "nsamples"),
        ({"nsamples": -3}, "-3"),
        ({"nsamples": 2.5}, "2.5"),
        ({"nsamples": "32"}, "nsamples"),
        ({"nsamples": True}, "nsamples"),
        ({"seqlen": 0}, "seqlen"),
        ({"seqlen": None}, "seqlen"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"seed": False}, "seed"),
        ({"damp": 0}, "damp"),
        ({"damp": 1.0}, "damp"),
        ({"damp": -0.01}, "-0.01"),
        ({"damp": float("nan")}, "damp"),
        ({"damp": "0.01"}, "damp"),
        ({"damp": True}, "damp"),
        ({"act_headroom": 0.5}, "act_headroom"),
        ({"act_headroom": float("nan")}, "act_headroom"),
        ({"act_headroom": float("inf")}, "act_headroom"),
        ({"act_headroom": True}, "act_headroom"),
        ({"act_headroom": "2"}, "act_headroom"),
        ({"shared_transform": 1}, "shared_transform"),
        ({"shared_transform": "yes"}, "shared_transform"),
        ({"offload_activations": None}, "offload_activations"),
        ({"skip_layers": None}, "skip_layers"),
        ({"skip_layers": [1, 2]}, "skip_layers"),
        ({"skip_layers": ["down_proj", ""]}, "skip_layers"),
        ({"skip_layers": 5}, "skip_layers"),
    ],
)
def test_bad_values_raise_naming_them(kwargs, needle):
    with pytest.raises(ValueError) as err:
        WushConfig(**kwargs)
    assert needle in str(err.value), str(err.value)


def test_skip_layers_forms():
    assert WushConfig(skip_layers="down_proj").skip_layers == ("down_proj",)
    assert WushConfig(skip_layers=["a.b", "c"]).skip_layers == ("a.b", "c")
    assert WushConfig(skip_layers=("x",)).skip_layers == ("x",)


@pytest.mark.parametrize(
    "cfg",
    [
        WushConfig(),
        WushConfig(format="nvfp4", method="rtn", transform="hadamard", nsamples=4, seqlen=16, seed=7,
                   shared_transform=True, offload_activations=False, skip_layers=("down_proj", "q_proj"),
                   damp=0.05, act_scale="fixed", act_headroom=1.5),
    ],
)
def test_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready: plain strings, lists, numbers, bools
    assert isinstance(d["format"], str) and isinstance(d["skip_layers"], list)
    assert WushConfig.from_dict(d) == cfg
    assert WushConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert set(d) == {f.name for f in dataclasses.fields(WushConfig)}


def test_from_dict_partial_uses_defaults():
    assert WushConfig.from_dict({"format": "nvfp4"}) == WushConfig(format=Format.NVFP4)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="group_size") as err:
        WushConfig.from_dict({"format": "mxfp4", "group_size": 16})
    assert "known settings" in str(err.value)


def test_from_dict_validates():
    with pytest.raises(ValueError, match="nsamples"):
        WushConfig.from_dict({"nsamples": 0})
