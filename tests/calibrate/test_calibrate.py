"""calibrate.calibrate on tiny random decoder LMs: end to end, determinism, groups, skips, errors."""

import math

import pytest
import torch
from torch import nn

import calibrate
from calibrate.architectures import ARCHITECTURES
from calibrate.capture import NonFiniteActivationError
from wush_compile import WushConfig, WushLinear
from wush_compile.config import NVFP4_FIXED_GLOBAL_SCALE

from .conftest import tiny_batches, tiny_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linears(model, cls):
    return {n: m for n, m in model.named_modules() if type(m) is cls}


def _logits_rel_err(qmodel, ref_model, ids):
    with torch.no_grad():
        ref = ref_model(ids).logits
        out = qmodel(ids).logits
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_end_to_end(fmt, method, batches):
    ref = tiny_model()
    model = tiny_model()
    out = calibrate.calibrate(model, batches, WushConfig(format=fmt, method=method))
    assert out is model
    wls = _linears(model, WushLinear)
    assert sorted(wls) == sorted(f"model.layers.{i}.{p}.{n}" for i in range(2) for p, n in
                                 [("self_attn", x) for x in PROJ[:4]] + [("mlp", x) for x in PROJ[4:]])
    assert _linears(model, nn.Linear).keys() == {"lm_head"}  # lm_head stays high precision
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    for name, wl in wls.items():
        assert wl.fmt.value == fmt and wl.transform.dtype == torch.float32
        assert list(dict(wl.named_parameters())) == []  # buffers only
        assert torch.isfinite(wl.transform).all()
        if fmt == "nvfp4":  # static activation scale from calibration, not the fixed fallback
            assert float(wl.act_global_scale) != pytest.approx(NVFP4_FIXED_GLOBAL_SCALE)
    report = calibrate.get_report(model)
    assert len(report.layers) == 14 and report.skipped == []
    errs = [r.rel_err for r in report.layers]
    assert all(0 < e < 0.5 for e in errs), errs
    assert report.mean_rel_err == pytest.approx(sum(errs) / len(errs))
    assert report.tokens == sum(b.numel() for b in batches)
    ids = tiny_batches(1, 2, 32, seed=7)[0]
    err = _logits_rel_err(model, ref, ids)
    assert err < 0.3, f"W4A4 logits relative error {err:.3f}"


def test_gptq_layer_errors_not_worse_than_rtn(batches):
    errs = {}
    for method in ("rtn", "gptq"):
        model = calibrate.calibrate(tiny_model(), batches, WushConfig(method=method))
        errs[method] = calibrate.get_report(model).mean_rel_err
    assert errs["gptq"] <= errs["rtn"] * 1.02, errs


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_deterministic_bit_identical(method, fmt, batches):
    cfg = WushConfig(format=fmt, method=method, transform="wush")
    a = calibrate.calibrate(tiny_model(), batches, cfg).state_dict()
    b = calibrate.calibrate(tiny_model(), [x.clone() for x in batches], cfg).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_random_transform_deterministic_per_seed(batches):
    cfg = WushConfig(method="rtn", transform="random", seed=3)
    a = calibrate.calibrate(tiny_model(), batches, cfg)
    b = calibrate.calibrate(tiny_model(), batches, cfg)
    c = calibrate.calibrate(tiny_model(), batches, cfg.replace(seed=4))
    ta = a.model.layers[0].self_attn.q_proj.transform
    assert torch.equal(ta, b.model.layers[0].self_attn.q_proj.transform)
    assert not torch.equal(ta, c.model.layers[0].self_attn.q_proj.transform)
    assert not torch.equal(ta, a.model.layers[0].self_attn.k_proj.transform)  # each layer its own draw


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_shared_transform(method, fmt, batches):
    model = calibrate.calibrate(tiny_model(), batches, WushConfig(format=fmt, method=method, shared_transform=True))
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            first = group[0]
            assert first.share_group is not None and first.share_group.startswith(f"model.layers.{i}.")
            for wl in group[1:]:
                assert wl.share_group == first.share_group
                assert torch.equal(wl.transform, first.transform)
                assert torch.equal(wl.act_global_scale, first.act_global_scale)
                assert torch.equal(wl.weight_global_scale, first.weight_global_scale)
        assert attn.o_proj.share_group is None and mlp.down_proj.share_group is None
        assert attn.q_proj.share_group != mlp.gate_proj.share_group
    unshared = calibrate.calibrate(tiny_model(), batches, WushConfig(format=fmt, method=method))
    a = unshared.model.layers[0].self_attn
    assert not torch.equal(a.q_proj.transform, a.k_proj.transform)
    assert a.q_proj.share_group is None


def test_skip_layers(batches):
    cfg = WushConfig(skip_layers=("down_proj", "model.layers.1.self_attn.q_proj"))
    model = calibrate.calibrate(tiny_model(), batches, cfg)
    plain = _linears(model, nn.Linear)
    assert set(plain) == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                          "model.layers.1.self_attn.q_proj"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, WushLinear)
    skipped = dict(calibrate.get_report(model).skipped)
    assert set(skipped) == set(plain) - {"lm_head"}
    assert "skip_layers" in skipped["model.layers.0.mlp.down_proj"]
    assert len(calibrate.get_report(model).layers) == 14 - 3


def test_k_not_multiple_of_group_stays_high_precision_and_is_reported(batches, caplog):
    # intermediate 80: down_proj has K=80, a multiple of 16 (NVFP4) but not of 32 (MXFP4).
    with caplog.at_level("INFO", logger="calibrate"):
        mx = calibrate.calibrate(tiny_model(intermediate=80), batches, WushConfig(format="mxfp4"))
    for i in range(2):
        assert type(mx.model.layers[i].mlp.down_proj) is nn.Linear
        assert isinstance(mx.model.layers[i].mlp.up_proj, WushLinear)
    report = calibrate.get_report(mx)
    reasons = dict(report.skipped)
    assert set(reasons) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "in_features=80" in reasons["model.layers.0.mlp.down_proj"] and "G=32" in reasons["model.layers.0.mlp.down_proj"]
    assert "model.layers.0.mlp.down_proj" in report.summary()
    assert "model.layers.1.mlp.down_proj stays in high precision" in caplog.text
    nv = calibrate.calibrate(tiny_model(intermediate=80), batches, WushConfig(format="nvfp4"))
    assert isinstance(nv.model.layers[0].mlp.down_proj, WushLinear)
    assert calibrate.get_report(nv).skipped == []


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_architectures(model_type, batches):
    ref = tiny_model(model_type)
    model = calibrate.calibrate(tiny_model(model_type), batches, WushConfig(method="gptq"))
    assert len(_linears(model, WushLinear)) == 14
    if model_type == "qwen2":  # q/k/v carry a bias; it is kept, in the model dtype
        wl = model.model.layers[0].self_attn.q_proj
        assert wl.bias is not None and torch.equal(wl.bias, ref.model.layers[0].self_attn.q_proj.bias)
    ids = tiny_batches(1, 1, 32, seed=9)[0]
    assert _logits_rel_err(model, ref, ids) < 0.3


def test_bfloat16_model(batches):
    model = calibrate.calibrate(tiny_model(dtype=torch.bfloat16), batches, WushConfig(method="gptq"))
    wl = model.model.layers[0].mlp.up_proj
    assert wl.transform.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(tiny_batches(1, 1, 16)[0]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_offload_setting_gives_same_result(batches):
    a = calibrate.calibrate(tiny_model(), batches, WushConfig(offload_activations=True)).state_dict()
    b = calibrate.calibrate(tiny_model(), batches, WushConfig(offload_activations=False)).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_one_dimensional_batches_accepted():
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(0))
    model = calibrate.calibrate(tiny_model(), [ids], WushConfig(method="rtn"))
    assert calibrate.get_report(model).tokens == 48


# ---- errors -------------------------------------------------------------------------------------------


def test_empty_batches_error():
    with pytest.raises(ValueError, match="no calibration batches.*calibration_batches"):
        calibrate.calibrate(tiny_model(), [], WushConfig())
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate.calibrate(tiny_model(), iter(()), WushConfig())


def test_wrong_batch_dtype_and_range_errors():
    with pytest.raises(TypeError, match=r"torch.float32; token ids must be an integer tensor"):
        calibrate.calibrate(tiny_model(), [torch.rand(2, 16)], WushConfig())
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 256\)"):
        calibrate.calibrate(tiny_model(), [torch.full((1, 8), 300)], WushConfig())
    with pytest.raises(TypeError, match="token-id tensors"):
        calibrate.calibrate(tiny_model(), [[1, 2, 3]], WushConfig())


def test_wrong_model_dtype_error(batches):
    with pytest.raises(TypeError, match=r"model dtype torch.float64 is not supported.*torch.float32"):
        calibrate.calibrate(tiny_model().double(), batches, WushConfig())


def test_wrong_config_type_error(batches):
    with pytest.raises(TypeError, match="WushConfig"):
        calibrate.calibrate(tiny_model(), batches, {"format": "mxfp4"})


def test_nan_activations_name_the_layer(batches):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        calibrate.calibrate(model, batches, WushConfig())


def test_nan_embeddings_error(batches):
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteActivationError, match="block 0"):
        calibrate.calibrate(model, batches, WushConfig())


def test_unsupported_architecture_lists_supported(batches):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256, n_positions=64))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'") as exc:
        calibrate.calibrate(model, batches, WushConfig())
    for name in ARCHITECTURES:
        assert name in str(exc.value)


def test_get_report_on_uncalibrated_model():
    with pytest.raises(ValueError, match="no calibration report"):
        calibrate.get_report(tiny_model())


def test_report_summary_mentions_counts(batches):
    model = calibrate.calibrate(tiny_model(), batches, WushConfig(skip_layers=("o_proj",)))
    text = calibrate.get_report(model).summary()
    assert "calibrated 12 Linears" in text and "2 Linears left in high precision" in text
    assert math.isfinite(calibrate.get_report(model).mean_rel_err)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_rtn_data_free_transform_equals_quantize_linear(fmt, batches):
    # RTN with a data-free transform depends only on the weight: calibrate must give quantize_linear's buffers.
    cfg = WushConfig(format=fmt, method="rtn", transform="hadamard")
    ref = tiny_model()
    model = calibrate.calibrate(tiny_model(), batches, cfg)
    for name, wl in _linears(model, WushLinear).items():
        direct = calibrate.quantize_linear(ref.get_submodule(name), None, cfg.replace(act_scale="fixed"), name=name)
        for buf in ("weight_codes", "weight_scales", "transform", "weight_global_scale"):
            assert torch.equal(getattr(wl, buf), getattr(direct, buf)), (name, buf)


def test_failed_calibration_leaves_the_model_as_it_was(batches):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")  # fails in the last block
    before["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="down_proj") as err:
        calibrate.calibrate(model, batches, WushConfig(method="rtn"))
    assert any("model is unchanged" in n for n in err.value.__notes__)
    assert not _linears(model, WushLinear), "a failed calibration left WushLinears in the caller's model"
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k], ) or k.endswith("down_proj.weight")
                                             for k in before)


def test_calibrating_a_calibrated_model_raises(batches):
    model = calibrate.calibrate(tiny_model(), batches, WushConfig(method="rtn", transform="hadamard"))
    with pytest.raises(ValueError, match="already calibrated"):
        calibrate.calibrate(model, batches, WushConfig(method="rtn", transform="identity"))


def test_unknown_skip_layers_names_close_matches(batches):
    with pytest.raises(ValueError, match=r"'down_prj' \(close: down_proj[,)]"):
        calibrate.calibrate(tiny_model(), batches, WushConfig(skip_layers=("down_prj",)))


def test_fewer_tokens_than_k_is_a_warning_with_numbers(caplog):
    few = [torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))]  # 40 < K = 64, 128
    with caplog.at_level("WARNING", logger="calibrate.pipeline"):
        model = calibrate.calibrate(tiny_model(), few, WushConfig(method="rtn", transform="wush"))
    (w,) = calibrate.get_report(model).warnings
    assert "40 calibration tokens are fewer than K=64, 128" in w and "use at least 128 tokens" in w
    assert w in caplog.text and w in calibrate.get_report(model).summary()
    enough = tiny_batches()  # 2 x 2 x 32 = 128 tokens
    assert not calibrate.get_report(calibrate.calibrate(tiny_model(), enough, WushConfig(method="rtn"))).warnings
