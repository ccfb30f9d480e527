"""NVFP4 activation saturation: the counter against the reference quantizer, and the dynamic activation scale."""

import pytest
import torch
from torch import nn

from wush_compile import WushConfig, formats, transforms
from wush_compile.config import ActScale
from wush_compile.modules import WushLinear
from wush_compile.saturation import SaturationCounter, counted_layers, saturation_limit

K, N = 64, 32


def _calibrated(policy: str, seed: int = 0):
    """(fp Linear, NVFP4 RTN + WUSH layer with act_scale=policy, calibration inputs (256, K))."""
    from calibrate.hessian import HessianAccumulator
    from calibrate.layer import quantize_linear

    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) / 8)
        lin.bias.copy_(torch.randn(N, generator=gen) / 10)
    x = torch.randn(256, K, generator=gen) * (1 + torch.rand(K, generator=gen) * 4)  # (256, K) anisotropic
    acc = HessianAccumulator(K)
    acc.add(x)
    cfg = WushConfig(format="nvfp4", method="rtn", transform="wush", act_scale=policy)
    return lin, quantize_linear(lin, acc.mean(), cfg, name="layer", inputs=x), x


def _rel_err(layer, lin, x):
    with torch.no_grad():
        y = lin(x)
        return float(torch.linalg.vector_norm(layer(x) - y) / torch.linalg.vector_norm(y))


def test_counter_counts_exactly_the_values_the_reference_quantizer_clips():
    _, layer, x = _calibrated("static")
    gen = torch.Generator().manual_seed(3)
    x = x[:64] * torch.where(torch.rand(64, K, generator=gen) < 0.05, 40.0, 1.0)  # some values far out of range
    with SaturationCounter(layer) as counter:
        layer(x)
    rep = counter.report()
    xt = transforms.transform_activations(x, layer.transform)  # (64, K) what the op quantizes
    limit = saturation_limit(layer)
    over = xt.abs() > limit
    codes, scales, g = formats.quantize(xt, "nvfp4", layer.act_global_scale)
    deq = formats.dequantize(codes, scales, g, "nvfp4")
    assert int(over.sum()) > 0, "the test input must saturate"
    assert rep.saturated == int(over.sum()) and rep.values == xt.numel()
    # every counted value is clipped to the largest representable magnitude; no other value is
    assert torch.equal(deq[over].abs(), torch.full_like(deq[over], float(limit))), "counted values are not clipped"
    assert bool((deq.abs() <= limit).all())
    assert rep.max_ratio == pytest.approx(float(xt.abs().max() / limit), rel=1e-6)
    assert rep.layers[0].name == "" and "clipped" in rep.summary()


def test_no_saturation_on_the_calibration_range_and_reset_per_counter():
    _, layer, x = _calibrated("static")
    with SaturationCounter(layer) as counter:
        layer(x)
    assert counter.report().saturated == 0
    with SaturationCounter(layer) as counter:
        layer(x * 64)
    rep = counter.report()
    assert rep.fraction > 0.3, rep.summary()
    layer(x * 64)  # hooks removed on exit: no more counting
    assert counter.report().values == rep.values


def test_dynamic_scale_never_saturates_and_keeps_its_error_far_above_the_calibration_range():
    lin, static, x = _calibrated("static")
    _, dynamic, _ = _calibrated("dynamic")
    assert dynamic.dynamic_act_scale and not static.dynamic_act_scale
    assert counted_layers(dynamic) == {}
    for s in (1.0, 64.0):
        xs = x * s
        want = torch.ops.wush.linear(xs, dynamic.weight_codes, dynamic.weight_scales, dynamic.transform,
                                     dynamic.weight_global_scale,
                                     formats.nvfp4_global_scale(transforms.transform_activations(xs, dynamic.transform)),
                                     dynamic.bias, "nvfp4")
        assert torch.equal(dynamic(xs), want)
    e_static = [_rel_err(static, lin, x * s) for s in (1.0, 64.0)]
    e_dyn = [_rel_err(dynamic, lin, x * s) for s in (1.0, 64.0)]
    assert e_dyn[1] == pytest.approx(e_dyn[0], rel=0.05), e_dyn  # scale-invariant up to the bias
    assert e_static[1] > 3 * e_dyn[1], (e_static, e_dyn)


def test_dynamic_scale_is_nvfp4_only():
    with pytest.raises(ValueError, match="NVFP4 only"):
        WushConfig(format="mxfp4", act_scale="dynamic")
    with pytest.raises(ValueError, match="NVFP4 only"):
        WushLinear(K, N, fmt="mxfp4", dynamic_act_scale=True)
    assert WushConfig(format="nvfp4", act_scale="dynamic").act_scale is ActScale.DYNAMIC


def test_dynamic_scale_compiled_equals_eager():
    torch._dynamo.reset()
    _, layer, x = _calibrated("dynamic")
    compiled = torch.compile(layer, backend="wush", options={"inductor": False})
    with torch.no_grad():
        assert torch.equal(compiled(x * 8), layer(x * 8))


def test_counter_hooks_do_nothing_under_compile():
    torch._dynamo.reset()
    _, layer, x = _calibrated("static")
    with SaturationCounter(layer) as counter:
        compiled = torch.compile(layer, backend="wush", options={"inductor": False})
        with torch.no_grad():
            out = compiled(x * 64)
    assert counter.report().values == 0
    assert torch.equal(out, layer(x * 64))
