"""The operand bundle (ops/operands.py): checked once per op call, passed down unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wush_compile import formats
from wush_compile.config import Format
from wush_compile.ops import checks, dispatch, operands, reference
from wush_compile.ops.operands import LinearOperands


def _layer(n=8, k=64, fmt="mxfp4", bias=True):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    codes, scales, w_gs = formats.quantize(w, fmt, None if fmt == "mxfp4" else torch.tensor(0.01))
    g = Format.parse(fmt).group_size
    t = torch.eye(g).expand(k // g, g, g).contiguous()
    a_gs = torch.tensor([1.0 / 3 if fmt == "mxfp4" else 0.05])
    b = torch.randn(n, generator=gen) if bias else None
    return codes, scales, t, w_gs.reshape(1).float(), a_gs, b


def test_checked_bundles_parsed_format_and_sizes():
    codes, scales, t, w_gs, a_gs, b = _layer(fmt="nvfp4")
    x = torch.randn(3, 64)
    ops = LinearOperands.checked(x, codes, scales, t, w_gs, a_gs, b, "nvfp4")
    assert ops.fmt is Format.NVFP4 and ops.n == 8 and ops.k == 64
    assert ops.args() == (codes, scales, t, w_gs, a_gs, b, "nvfp4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ops.bias = None  # type: ignore[misc]


def test_checked_raises_the_op_errors():
    codes, scales, t, w_gs, a_gs, b = _layer()
    with pytest.raises(ValueError, match=r"wush fused_linear: input has K=32 features but the layer was calibrated for K=64"):
        LinearOperands.checked(torch.randn(2, 32), codes, scales, t, w_gs, a_gs, b, "mxfp4", op="wush fused_linear")
    with pytest.raises(ValueError, match="needs one weight_codes, weight_scales, weight_global_scale and bias"):
        operands.group_operands(torch.randn(2, 64), [codes], [scales, scales], t, [w_gs], a_gs, [b], "mxfp4")
    with pytest.raises(ValueError, match="wush fused_linear_group member 1: bias must be"):
        operands.group_operands(torch.randn(2, 64), [codes, codes], [scales, scales], t, [w_gs, w_gs], a_gs,
                                [b, torch.zeros(3)], "mxfp4")


@pytest.mark.parametrize("kernel", ["reference", "triton_decode", "cublas_bf16"])
@pytest.mark.parametrize("op", ["fused_linear", "fused_linear_group"])
def test_one_check_per_member_per_call(op, kernel, monkeypatch):
    """check_linear_args runs once per op call (per member of a group), on the reference and on the Triton routes
    (in the interpreter on CPU), and the result matches the twin."""
    if kernel != "reference" and not dispatch.supports(kernel, "mxfp4", "cpu")[0]:
        pytest.skip(dispatch.supports(kernel, "mxfp4", "cpu")[1])
    calls = []
    real = checks.check_linear_args
    monkeypatch.setattr(operands, "check_linear_args", lambda *a, **k: calls.append(1) or real(*a, **k))
    codes, scales, t, w_gs, a_gs, b = _layer()
    x = torch.randn(2, 3, 64)
    want = reference.linear_ref(x.reshape(-1, 64), codes, scales, t, w_gs, a_gs, b, "mxfp4").reshape(2, 3, 8)
    if op == "fused_linear":
        y = torch.ops.wush.fused_linear(x, codes, scales, t, w_gs, a_gs, b, "mxfp4", kernel)
        assert len(calls) == 1
    else:
        (y, y2) = torch.ops.wush.fused_linear_group(x, [codes, codes], [scales, scales], t, [w_gs, w_gs], a_gs,
                                                    [b, b], "mxfp4", kernel)
        assert len(calls) == 2
        assert torch.allclose(y2, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)


def test_router_runs_the_reference_on_a_bundle():
    codes, scales, t, w_gs, a_gs, b = _layer()
    x = torch.randn(5, 64)
    ops = LinearOperands.checked(x, codes, scales, t, w_gs, a_gs, b, "mxfp4")
    want = reference.linear_ref(x, codes, scales, t, w_gs, a_gs, b, "mxfp4")
    from wush_compile.config import KernelChoice

    assert torch.equal(dispatch.run_linear(KernelChoice.REFERENCE, x, ops), want)
    # a route that cannot run on CPU tensors runs the reference instead (with one logged note)
    assert torch.equal(dispatch.run_linear(KernelChoice.CUDA_DECODE, x, ops), want)
