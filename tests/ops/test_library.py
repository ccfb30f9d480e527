"""The wush custom ops: opcheck, equality with the torch twins, and trace-time errors from the fakes."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import wush_compile  # noqa: F401  (registers the ops)
from wush_compile import formats
from wush_compile.config import Format
from wush_compile.ops import reference

from ..runtime._models import wush_linear_from

FMTS = ("mxfp4", "nvfp4")


def _layer(fmt: str, n: int = 48, k: int = 64, bias: bool = True, dtype=torch.float32, kind: str = "wush", seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype)
    h = torch.randn(256, k)
    return wush_linear_from(lin, fmt, kind, hessian=h.T @ h / 256)


def _args(m, x):
    return (x, m.weight_codes, m.weight_scales, m.transform, m.weight_global_scale, m.act_global_scale, m.bias,
            m.fmt.value)


def _x(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype)


# ------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_ops(fmt, bias):
    m = _layer(fmt, bias=bias)
    for x in (_x(5, 64), _x(2, 3, 64), _x(1, 64)):
        torch.library.opcheck(torch.ops.wush.linear.default, _args(m, x))
        torch.library.opcheck(torch.ops.wush.fused_linear.default, _args(m, x) + ("auto",))
        torch.library.opcheck(torch.ops.wush.fused_linear.default, _args(m, x) + ("reference",))


@pytest.mark.parametrize("fmt", FMTS)
def test_opcheck_transform_quantize_and_gemm(fmt):
    m = _layer(fmt)
    x = _x(7, 64)
    torch.library.opcheck(torch.ops.wush.transform_quantize.default, (x, m.transform, m.act_global_scale, fmt))
    torch.library.opcheck(torch.ops.wush.transform_quantize.default, (_x(2, 3, 64), m.transform, m.act_global_scale, fmt))
    a_codes, a_scales = reference.transform_quantize_ref(x, m.transform, m.act_global_scale, fmt)
    for out_dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(
            torch.ops.wush.fp4_gemm.default,
            (a_codes, a_scales, m.act_global_scale, m.weight_codes, m.weight_scales, m.weight_global_scale, m.bias,
             fmt, out_dtype),
        )


@pytest.mark.parametrize("fmt", FMTS)
def test_opcheck_group(fmt):
    ms = [_layer(fmt, n=n, bias=b, kind="hadamard", seed=i) for i, (n, b) in enumerate([(48, True), (16, False)])]
    x = _x(2, 5, 64)
    args = (x, [m.weight_codes for m in ms], [m.weight_scales for m in ms], ms[0].transform,
            [m.weight_global_scale for m in ms], ms[0].act_global_scale, [m.bias for m in ms], fmt, "auto")
    torch.library.opcheck(torch.ops.wush.fused_linear_group.default, args)


# ------------------------------------------------------------------------------- equality with twins


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_quantize_bit_exact(fmt, dtype):
    m = _layer(fmt, dtype=dtype)
    x = _x(4, 3, 64, dtype=dtype)
    x[0, 0, :16] = 0.0  # a zero group (smallest scale)
    codes, scales = torch.ops.wush.transform_quantize(x, m.transform, m.act_global_scale, fmt)
    rc, rs = reference.transform_quantize_ref(x.reshape(-1, 64), m.transform, m.act_global_scale, fmt)
    assert codes.shape == (4, 3, 32) and scales.shape == (4, 3, 64 // Format.parse(fmt).group_size)
    assert torch.equal(codes.reshape(-1, 32), rc), "codes must match the reference bit for bit"
    assert torch.equal(scales.reshape(rs.shape), rs), "scales must match the reference bit for bit"


@pytest.mark.parametrize("fmt", FMTS)
def test_fused_linear_equals_reference_linear(fmt):
    m = _layer(fmt)
    x = _x(3, 5, 64)
    ref = torch.ops.wush.linear(*_args(m, x))
    fused = torch.ops.wush.fused_linear(*_args(m, x), "auto")
    assert torch.equal(fused, ref), "on CPU fused_linear runs the same torch twin: it must be bit-identical"
    # And the op equals the module's math end to end (dequantized operands, fp64).
    a_codes, a_scales = reference.transform_quantize_ref(x.reshape(-1, 64), m.transform, m.act_global_scale, fmt)
    a = formats.dequantize(a_codes, a_scales, m.act_global_scale, fmt, dtype=torch.float64)
    w = formats.dequantize(m.weight_codes, m.weight_scales, m.weight_global_scale, fmt, dtype=torch.float64)
    exact = a @ w.T + m.bias.double()
    err = (fused.reshape(-1, 48).double() - exact).abs().max().item()
    bound = 1e-5 * exact.abs().max().item()
    assert err <= bound, f"fp32-accumulation rounding: |fused - fp64| = {err:.3g} > 1e-5 * max|y| = {bound:.3g}"


@pytest.mark.parametrize("fmt", FMTS)
def test_group_equals_members(fmt):
    ms = [_layer(fmt, n=n, kind="hadamard", seed=i) for i, n in enumerate([48, 16, 32])]
    x = _x(2, 5, 64)
    outs = torch.ops.wush.fused_linear_group(
        x, [m.weight_codes for m in ms], [m.weight_scales for m in ms], ms[0].transform,
        [m.weight_global_scale for m in ms], ms[0].act_global_scale, [m.bias for m in ms], fmt, "reference")
    for m, y in zip(ms, outs):
        assert torch.equal(y, m(x)), "the grouped op must equal each member's own linear bit for bit"


def test_fp4_gemm_matches_fp64():
    m = _layer("nvfp4")
    x = _x(9, 64)
    a_codes, a_scales = torch.ops.wush.transform_quantize(x, m.transform, m.act_global_scale, "nvfp4")
    y = torch.ops.wush.fp4_gemm(a_codes, a_scales, m.act_global_scale, m.weight_codes, m.weight_scales,
                                m.weight_global_scale, None, "nvfp4", torch.float32)
    a = formats.dequantize(a_codes, a_scales, m.act_global_scale, "nvfp4", dtype=torch.float64)
    w = formats.dequantize(m.weight_codes, m.weight_scales, m.weight_global_scale, "nvfp4", dtype=torch.float64)
    exact = a @ w.T
    err = (y.double() - exact).abs().max().item()
    assert err <= 1e-5 * exact.abs().max().item(), f"fp32-accumulation rounding: error {err:.3g}"


# ---------------------------------------------------------------------------- trace-time errors (fakes)


def _fake(mode, t):
    return mode.from_tensor(t) if t is not None else None


@pytest.mark.parametrize(
    "op", [torch.ops.wush.linear.default, torch.ops.wush.fused_linear.default]
)
def test_fake_errors_name_the_value(op):
    m = _layer("mxfp4")
    extra = ("auto",) if op is torch.ops.wush.fused_linear.default else ()
    with FakeTensorMode() as mode:
        fm = [_fake(mode, t) for t in _args(m, _x(2, 64))[1:7]]
        good = mode.from_tensor(_x(2, 64))
        assert op(good, *fm, "mxfp4", *extra).shape == (2, 48)
        with pytest.raises(TypeError, match=r"float32, bfloat16 or float16, got torch.int64; cast the input"):
            op(good.long(), *fm, "mxfp4", *extra)
        with pytest.raises(ValueError, match=r"K=32 features but the layer was calibrated for K=64"):
            op(mode.from_tensor(_x(2, 32)), *fm, "mxfp4", *extra)
        with pytest.raises(ValueError, match=r"input is on meta but weight_codes is on cpu; move the model"):
            op(torch.empty(2, 64, device="meta"), *fm, "mxfp4", *extra)
        with pytest.raises(ValueError, match=r"unknown value 'fp8'"):
            op(good, *fm, "fp8", *extra)
        bad_gs = fm[:3] + [fm[3].double()] + fm[4:]
        with pytest.raises(TypeError, match=r"weight_global_scale must be an fp32 scalar"):
            op(good, *bad_gs, "mxfp4", *extra)


def test_fake_errors_other_ops():
    m = _layer("nvfp4")
    with FakeTensorMode() as mode:
        t, gs = mode.from_tensor(m.transform), mode.from_tensor(m.act_global_scale)
        with pytest.raises(ValueError, match=r"K=40 is not a multiple of the nvfp4 group size G=16"):
            torch.ops.wush.transform_quantize(mode.from_tensor(_x(2, 40)), t, gs, "nvfp4")
        with pytest.raises(ValueError, match=r"transform must be \(2, 32, 32\) for K=64 and mxfp4"):
            torch.ops.wush.transform_quantize(mode.from_tensor(_x(2, 64)), t, gs, "mxfp4")
        codes = mode.from_tensor(torch.zeros(3, 16, dtype=torch.uint8))
        scales = mode.from_tensor(torch.zeros(3, 2, dtype=torch.uint8))
        wc, ws, wg = (mode.from_tensor(v) for v in (m.weight_codes, m.weight_scales, m.weight_global_scale))
        with pytest.raises(ValueError, match=r"activation codes hold K=32 values per row but the weight codes hold K=64"):
            torch.ops.wush.fp4_gemm(codes, scales, gs, wc, ws, wg, None, "nvfp4", torch.float32)
        with pytest.raises(ValueError, match=r"kernel: KernelChoice: unknown value 'fastest'"):
            torch.ops.wush.fused_linear(mode.from_tensor(_x(2, 64)), wc, ws, t, wg, gs, None, "nvfp4", "fastest")
        with pytest.raises(ValueError, match=r"one weight_codes, weight_scales, weight_global_scale and bias"):
            torch.ops.wush.fused_linear_group(mode.from_tensor(_x(2, 64)), [wc, wc], [ws], t, [wg, wg], gs,
                                              [None, None], "nvfp4", "auto")


def test_errors_at_trace_time_under_compile():
    """A wrong K / dtype fails while dynamo traces (in the fake), before any kernel runs."""
    m = _layer("mxfp4")
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="wush", fullgraph=True, options={"inductor": False})
    with pytest.raises(Exception, match=r"K=32 features but the layer was calibrated for K=64") as exc:
        compiled(_x(2, 32))
    assert "Dynamo" in type(exc.value).__module__ or "dynamo" in type(exc.value).__module__, type(exc.value)
    with pytest.raises(Exception, match=r"got torch.float64; cast the input"):
        compiled(_x(2, 64).double())
