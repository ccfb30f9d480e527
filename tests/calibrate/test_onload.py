"""Quantize on load: from_pretrained(path, quantization_config=WushQuantizationConfig(method="rtn", ...))."""

import pytest
import torch

import calibrate
import wush_compile  # noqa: F401  (registers quant_method "wush")
from transformers import AutoModelForCausalLM
from wush_compile import WushConfig, WushLinear
from wush_compile.hf import WushQuantizationConfig

from .conftest import tiny_batches, tiny_model


@pytest.fixture
def fp_dir(tmp_path):
    path = tmp_path / "fp"
    tiny_model().save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt, transform", [("mxfp4", "hadamard"), ("mxfp4", "identity"), ("nvfp4", "random")])
def test_quantize_on_load_equals_calibrate(fp_dir, tmp_path, fmt, transform):
    qc = WushQuantizationConfig(format=fmt, method="rtn", transform=transform)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=qc)
    wls = {n: m for n, m in model.named_modules() if isinstance(m, WushLinear)}
    assert len(wls) == 14 and all(m.fmt.value == fmt and m.transform_kind.value == transform for m in wls.values())
    # the same layers as data-free RTN through calibrate (codes, scales and transforms bit for bit)
    act = "fixed" if fmt == "nvfp4" else "static"
    ref = calibrate.calibrate(tiny_model(), tiny_batches(1),
                              WushConfig(format=fmt, method="rtn", transform=transform, act_scale=act))
    ref_wls = {n: m for n, m in ref.named_modules() if isinstance(m, WushLinear)}
    for name, wl in wls.items():
        for buf in ("weight_codes", "weight_scales", "transform", "act_global_scale"):
            assert torch.equal(getattr(wl, buf), getattr(ref_wls[name], buf)), (name, buf)
    ids = tiny_batches(1, 1, 16, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # saved, it reloads as a pre-quantized wush checkpoint with the same logits
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(method="rtn", transform="wush"), "'wush'"), (dict(method="gptq", transform="hadamard"), "'gptq'"),
     (dict(), "'gptq'")],
)
def test_data_aware_on_load_names_quantize(fp_dir, kwargs, word):
    with pytest.raises(ValueError, match=rf"{word}.*wush_compile\.quantize"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=WushQuantizationConfig(**kwargs))
