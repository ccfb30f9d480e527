"""NVFP4 activation saturation in the workflow: the explain report, `wush eval`, and the dynamic activation scale
through calibrate -> save -> load and `wush quantize --act-scale dynamic`."""

import json

import pytest
import torch

import calibrate
import wush_compile
from wush_compile import WushConfig, hf
from wush_compile.hf import CheckpointError
from wush_compile.saturation import counted_layers

from .conftest import tiny_batches, tiny_model
from .test_cli import _base, _main, workdir  # noqa: F401  (module fixture)


def _nvfp4(policy):
    model = tiny_model()
    calibrate.calibrate(model, tiny_batches(), WushConfig(format="nvfp4", method="rtn", transform="hadamard",
                                                          act_scale=policy))
    return model


def _shrink_scales(model, factor):
    """Static activation scales ``factor`` times smaller: inputs now far above the calibration range."""
    with torch.no_grad():
        for m in counted_layers(model).values():
            m.act_global_scale.div_(factor)
            m.refresh_transform_key()


def test_explain_reports_saturation_of_static_nvfp4_layers():
    model = _nvfp4("static")
    ids = tiny_batches(1, 1, 16, seed=5)[0]
    report = wush_compile.explain(model, ids, compile_options={"inductor": False})
    sat = report.saturation
    layers = counted_layers(model)
    assert sat is not None and {r.name for r in sat.layers} == set(layers)
    assert sat.values == sum(16 * m.in_features for m in layers.values())
    assert "NVFP4 activation saturation" in str(report)
    _shrink_scales(model, 256)
    sat = wush_compile.explain(model, ids, compile_options={"inductor": False}).saturation
    assert sat.saturated > 0 and sat.max_ratio > 1, sat.summary()
    assert "act_scale='dynamic'" in sat.summary()


def test_explain_has_no_saturation_for_mxfp4_or_dynamic():
    ids = tiny_batches(1, 1, 8, seed=5)[0]
    for model in (_nvfp4("dynamic"), tiny_model()):
        if not any(isinstance(m, wush_compile.WushLinear) for m in model.modules()):
            calibrate.calibrate(model, tiny_batches(), WushConfig(method="rtn", transform="hadamard"))
        report = wush_compile.explain(model, ids, compile_options={"inductor": False})
        assert report.saturation is None and "saturation" not in str(report)


def test_dynamic_scale_survives_save_and_load(tmp_path):
    model = _nvfp4("dynamic")
    assert all(m.dynamic_act_scale for m in hf.quantized_modules(model).values())
    model.save_pretrained(tmp_path / "d")
    qc = json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]
    assert all(e.get("dynamic_act_scale") is True for e in qc["modules"].values())
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert all(m.dynamic_act_scale for m in hf.quantized_modules(loaded).values())
    x = tiny_batches(1, 2, 16, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_dynamic_flag_disagreeing_with_the_calibration_config_is_refused():
    model = _nvfp4("dynamic")
    qc = hf.WushQuantizationConfig.from_model(model, hf.wush_config(model)).to_dict()
    first = next(iter(qc["modules"]))
    del qc["modules"][first]["dynamic_act_scale"]
    qc.pop("quant_method")
    with pytest.raises(CheckpointError, match="act_scale is 'dynamic'"):
        hf.WushQuantizationConfig(**qc)


def test_eval_prints_saturation_and_quantize_act_scale_dynamic(workdir, capsys):  # noqa: F811
    ev = ["--eval-text", str(workdir / "eval.txt"), "--seqlen", "64", "--eval-tokens", "256"]
    for policy in ("static", "dynamic"):
        out = workdir / f"nvfp4-{policy}"
        assert _main(_base(workdir, "--format", "nvfp4", "--method", "rtn", "--transform", "hadamard",
                           "--act-scale", policy, "--out", str(out))) == 0
        capsys.readouterr()
        assert _main(["eval", str(out), *ev]) == 0
        printed = capsys.readouterr().out
        if policy == "static":
            line = next(ln for ln in printed.splitlines() if ln.startswith("NVFP4 activation saturation"))
            assert " of " in line and "values" in line
        else:
            assert "saturation" not in printed  # dynamic layers are not counted: they cannot saturate
            qc = json.loads((out / "config.json").read_text())["quantization_config"]
            assert qc["calibration"]["act_scale"] == "dynamic"
    assert _main(["eval", str(workdir / "nvfp4-static"), *ev, "--compile"]) == 0
    assert "not counted under --compile" in capsys.readouterr().out
