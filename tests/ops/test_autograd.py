"""Gradients through the wush ops (straight-through estimator on the activation quantizer) and torch.compile of a
calibrated model in grad mode (embeddings and lm_head still requiring grad, as after from_pretrained)."""

from __future__ import annotations

import pytest
import torch

import wush_compile  # noqa: F401  (registers the ops and the backend)
from wush_compile import formats
from wush_compile.transforms import transform_activations

from ..runtime._models import calibrate_llama, tiny_llama, wush_linear_from

FMTS = ("mxfp4", "nvfp4")


def _layer(fmt, n=48, k=64, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=True)
    h = torch.randn(256, k)
    return wush_linear_from(lin, fmt, "wush", hessian=h.T @ h / 256)


def _surrogate(m, x):
    """SPEC section 5 with quantize read as the identity: the function whose gradient the ops return."""
    w = formats.dequantize(m.weight_codes, m.weight_scales, m.weight_global_scale, m.fmt.value)  # (N, K)
    return transform_activations(x.reshape(-1, x.shape[-1]), m.transform) @ w.t() + m.bias


@pytest.mark.parametrize("fmt", FMTS)
def test_linear_ops_gradient_is_straight_through(fmt):
    m = _layer(fmt)
    m.bias.requires_grad_(True)
    x = torch.randn(2, 3, 64, requires_grad=True)
    gy = torch.randn(2, 3, 48)
    want_x, want_b = torch.autograd.grad(_surrogate(m, x).reshape(2, 3, 48), (x, m.bias), gy)
    args = (m.weight_codes, m.weight_scales, m.transform, m.weight_global_scale, m.act_global_scale, m.bias,
            m.fmt.value)
    for op, extra in ((torch.ops.wush.linear, ()), (torch.ops.wush.fused_linear, ("auto",))):
        gx, gb = torch.autograd.grad(op(x, *args, *extra), (x, m.bias), gy)
        torch.testing.assert_close(gx, want_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, want_b)


def test_group_op_gradient_sums_the_members():
    a, b = _layer("mxfp4", n=48, seed=0), _layer("mxfp4", n=16, seed=1)
    b.transform.copy_(a.transform)  # a group shares one transform
    x = torch.randn(5, 64, requires_grad=True)
    gys = [torch.randn(5, 48), torch.randn(5, 16)]
    want = torch.autograd.grad([_surrogate(a, x), _surrogate(b, x)], x, gys)[0]
    outs = torch.ops.wush.fused_linear_group(
        x, [a.weight_codes, b.weight_codes], [a.weight_scales, b.weight_scales], a.transform,
        [a.weight_global_scale, b.weight_global_scale], a.act_global_scale, [None, None], "mxfp4", "auto")
    got = torch.autograd.grad(outs, x, gys)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # mixed biases (one member with a bias, one without)
    outs = torch.ops.wush.fused_linear_group(
        x, [a.weight_codes, b.weight_codes], [a.weight_scales, b.weight_scales], a.transform,
        [a.weight_global_scale, b.weight_global_scale], a.act_global_scale, [a.bias, None], "mxfp4", "auto")
    gx = torch.autograd.grad(outs, x, gys, retain_graph=True)[0]
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)
    only_second = torch.autograd.grad(outs[1], x, gys[1])[0]
    torch.testing.assert_close(only_second, torch.autograd.grad(_surrogate(b, x), x, gys[1])[0], rtol=1e-5, atol=1e-5)


def test_opcheck_with_grad_inputs():
    m = _layer("nvfp4")
    x = torch.randn(4, 64, requires_grad=True)
    args = (x, m.weight_codes, m.weight_scales, m.transform, m.weight_global_scale, m.act_global_scale, m.bias, "nvfp4")
    torch.library.opcheck(torch.ops.wush.linear.default, args)
    torch.library.opcheck(torch.ops.wush.fused_linear.default, args + ("auto",))


def test_compile_in_grad_mode_matches_eager_and_backpropagates():
    model = calibrate_llama(tiny_llama(seed=3, vocab=128), "mxfp4", "wush", shared_transform=True)
    assert model.model.embed_tokens.weight.requires_grad  # as a model fresh from from_pretrained
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    eager = model(ids).logits
    compiled = torch.compile(model, backend="wush", fullgraph=True)
    out = compiled(ids).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    g_eager = torch.autograd.grad(eager.square().mean(), model.model.embed_tokens.weight)[0]
    g_comp = torch.autograd.grad(out.square().mean(), model.model.embed_tokens.weight)[0]
    assert g_eager.abs().sum() > 0
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_weight_op(fmt):
    m = _layer(fmt)
    args = (m.weight_codes, m.weight_scales, m.weight_global_scale, fmt)
    torch.library.opcheck(torch.ops.wush.dequantize_weight.default, args)
    want = formats.dequantize(*args)
    assert torch.equal(torch.ops.wush.dequantize_weight(*args), want)
