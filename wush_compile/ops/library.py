"""torch.library ops of the ``wush`` namespace: schemas, fake (meta) implementations, CPU implementations
(the torch twins of :mod:`wush_compile.ops.reference`) and CUDA implementations (through the router,
:mod:`wush_compile.ops.dispatch`, which runs the Triton launchers of :mod:`wush_compile.ops.kernels` or the CUDA
launchers of :mod:`wush_compile.cuda`).

Ops:
    wush::linear(x, codes, scales, T, w_gs, a_gs, bias, fmt) -> y
        The reference calibrated linear. A calibrated module's eager forward calls it, so every buffer is a
        graph input and the backend's FX pass can find and rewrite it. Always the torch twin.
    wush::transform_quantize(x, T, a_gs, fmt) -> (codes, scales)
        Blockwise activation transform + FP4 quantization; (..., K) -> (..., K/2), (..., K/G) uint8.
    wush::fp4_gemm(a_codes, a_scales, a_gs, w_codes, w_scales, w_gs, bias, fmt, out_dtype) -> y
        Block-scaled FP4 x FP4 GEMM with fp32 accumulation; (M, K/2) x (N, K/2) -> (M, N).
    wush::fused_linear(x, codes, scales, T, w_gs, a_gs, bias, fmt, kernel) -> y
        The rewrite target: transform+quantize fused with the GEMM, run by the kernel named in ``kernel``
        (a KernelChoice value; "auto" decides per call from M, see :mod:`wush_compile.ops.dispatch`).
    wush::fused_linear_group(x, codes[], scales[], T, w_gs[], a_gs, biases[], fmt, kernel) -> y[]
        Layers that read the same x with an identical transform (and activation scale): x is transformed and
        quantized once, then each member's GEMM runs on the shared codes.

Every fake checks its inputs (dtype, device, K, shapes) so that a bad input fails at trace time with a
message naming the value and the fix, never inside a kernel. Fakes work with a symbolic M.

These are ``custom_op``s rather than ``triton_op``s: the launchers pick tiles and paths in Python from the
real shapes, and ``auto`` ops choose the kernel from the real M per call; Inductor keeps them as extern calls.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from . import dispatch, reference
from .checks import check_gemm_args, check_kernel_arg, check_linear_args, check_quantize_args
from .operands import LinearOperands, group_operands

logger = logging.getLogger(__name__)

__all__ = [
    "linear",
    "transform_quantize",
    "fp4_gemm",
    "fused_linear",
    "fused_linear_group",
    "check_linear_args",
    "check_quantize_args",
    "check_gemm_args",
    "check_kernel_arg",
    "LINEAR_OPS",
    "FUSED_OPS",
]

# ------------------------------------------------------------------------------------------- impl helpers
#
# The CUDA (and Triton-in-the-interpreter) implementations check their operands once into a LinearOperands and
# hand it to the router (:mod:`.dispatch`), which picks the route and runs it; nothing below decides a kernel.


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (M, K)


# -------------------------------------------------------------------------------------------- wush::linear


@torch.library.custom_op("wush::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scales: torch.Tensor,
    transform: torch.Tensor,
    weight_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
) -> torch.Tensor:
    """Reference calibrated linear (SPEC section 5): y = dequant(quant(x @ T^T)) @ dequant(W')^T * gs + b."""
    check_linear_args(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt)
    return reference.linear_ref(
        x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt
    )


@linear.register_fake
def _linear_fake(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt):
    check_linear_args(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt)
    return x.new_empty((*x.shape[:-1], weight_codes.shape[0]))


# -------------------------------------------------------------------------------- wush::transform_quantize


@torch.library.custom_op("wush::transform_quantize", mutates_args=(), device_types="cpu")
def transform_quantize(
    x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise transform (fp32 accumulation) + quantize (SPEC section 3): (..., K) -> codes (..., K/2),
    scales (..., K/G). CPU: the torch twin."""
    check_quantize_args(x, transform, act_global_scale, fmt)
    codes, scales = reference.transform_quantize_ref(_flatten(x), transform, act_global_scale, fmt)
    return codes.reshape(*x.shape[:-1], -1), scales.reshape(*x.shape[:-1], -1)


@transform_quantize.register_kernel("cuda")
def _transform_quantize_cuda(x, transform, act_global_scale, fmt):
    f = check_quantize_args(x, transform, act_global_scale, fmt)
    codes, scales = dispatch.run_transform_quantize(_flatten(x), transform, act_global_scale, f)
    return codes.reshape(*x.shape[:-1], -1), scales.reshape(*x.shape[:-1], -1)


@transform_quantize.register_fake
def _transform_quantize_fake(x, transform, act_global_scale, fmt):
    f = check_quantize_args(x, transform, act_global_scale, fmt)
    k = x.shape[-1]
    codes = x.new_empty((*x.shape[:-1], k // 2), dtype=torch.uint8)
    scales = x.new_empty((*x.shape[:-1], k // f.group_size), dtype=torch.uint8)
    return codes, scales


# ---------------------------------------------------------------------------------------- wush::fp4_gemm


@torch.library.custom_op("wush::fp4_gemm", mutates_args=(), device_types="cpu")
def fp4_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_global_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Block-scaled FP4 x FP4 GEMM, fp32 accumulation, times both global scales, plus bias: (M, N). CPU: twin."""
    check_gemm_args(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, out_dtype)
    return reference.fp4_gemm_ref(
        a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, out_dtype
    )


@fp4_gemm.register_kernel("cuda")
def _fp4_gemm_cuda(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, out_dtype):
    f = check_gemm_args(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, out_dtype)
    return dispatch.run_fp4_gemm(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, f,
                                 out_dtype)


@fp4_gemm.register_fake
def _fp4_gemm_fake(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, out_dtype):
    check_gemm_args(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, out_dtype)
    return a_codes.new_empty((a_codes.shape[0], w_codes.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------------ wush::fused_linear


def _fused_linear_impl(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt,
                       kernel):
    ops = LinearOperands.checked(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale,
                                 bias, fmt, op="wush fused_linear")
    x2 = _flatten(x)  # (M, K)
    choice = dispatch.runtime_choice(kernel, x2.shape[0], ops.n, ops.k, ops.fmt, x.device)
    y = dispatch.run_linear(choice, x2, ops)  # (M, N)
    return y.reshape(*x.shape[:-1], ops.n)


@torch.library.custom_op("wush::fused_linear", mutates_args=(), device_types="cpu")
def fused_linear(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scales: torch.Tensor,
    transform: torch.Tensor,
    weight_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    kernel: str,
) -> torch.Tensor:
    """The calibrated linear with transform+quantize fused into the GEMM, run by ``kernel`` (a KernelChoice
    value; "auto" = per call from M). CPU: the torch twin (a Triton choice runs under TRITON_INTERPRET=1)."""
    return _fused_linear_impl(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale,
                              bias, fmt, kernel)


fused_linear.register_kernel("cuda")(_fused_linear_impl)


@fused_linear.register_fake
def _fused_linear_fake(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt,
                       kernel):
    check_linear_args(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt,
                      op="wush fused_linear")
    check_kernel_arg(kernel, "wush fused_linear")
    return x.new_empty((*x.shape[:-1], weight_codes.shape[0]))


# ------------------------------------------------------------------------------ wush::fused_linear_group


def _check_group(x, codes, scales, transform, weight_global_scales, act_global_scale, biases, fmt,
                 kernel) -> tuple[LinearOperands, ...]:
    op = "wush fused_linear_group"
    members = group_operands(x, codes, scales, transform, weight_global_scales, act_global_scale, biases, fmt, op=op)
    check_kernel_arg(kernel, op)
    return members


def _fused_linear_group_impl(x, weight_codes, weight_scales, transform, weight_global_scales, act_global_scale,
                             biases, fmt, kernel):
    members = _check_group(x, weight_codes, weight_scales, transform, weight_global_scales, act_global_scale,
                           biases, fmt, kernel)
    x2 = _flatten(x)  # (M, K)
    lead = x.shape[:-1]
    n_total = sum(ops.n for ops in members)
    choice = dispatch.runtime_choice(kernel, x2.shape[0], n_total, members[0].k, members[0].fmt, x.device)
    outs = dispatch.run_linear_group(choice, x2, members)
    return [y.reshape(*lead, ops.n) for y, ops in zip(outs, members)]


@torch.library.custom_op("wush::fused_linear_group", mutates_args=(), device_types="cpu")
def fused_linear_group(
    x: torch.Tensor,
    weight_codes: Sequence[torch.Tensor],
    weight_scales: Sequence[torch.Tensor],
    transform: torch.Tensor,
    weight_global_scales: Sequence[torch.Tensor],
    act_global_scale: torch.Tensor,
    biases: Sequence[Optional[torch.Tensor]],
    fmt: str,
    kernel: str,
) -> list[torch.Tensor]:
    """Several calibrated linears on the same x with one shared transform and activation scale: x is transformed
    and quantized once, then each member's FP4 GEMM runs (member i -> output i)."""
    return _fused_linear_group_impl(x, weight_codes, weight_scales, transform, weight_global_scales,
                                    act_global_scale, biases, fmt, kernel)


fused_linear_group.register_kernel("cuda")(_fused_linear_group_impl)


@fused_linear_group.register_fake
def _fused_linear_group_fake(x, weight_codes, weight_scales, transform, weight_global_scales, act_global_scale,
                             biases, fmt, kernel):
    _check_group(x, weight_codes, weight_scales, transform, weight_global_scales, act_global_scale, biases, fmt,
                 kernel)
    return [x.new_empty((*x.shape[:-1], c.shape[0])) for c in weight_codes]


#: The reference op the modules call (targets the FX pass looks for).
LINEAR_OPS = (torch.ops.wush.linear, torch.ops.wush.linear.default)
#: The ops the rewrite produces.
FUSED_OPS = (torch.ops.wush.fused_linear.default, torch.ops.wush.fused_linear_group.default)


# ------------------------------------------------------------------------------------------------ autograd
#
# The calibrated linears are inference layers, but a model whose embeddings or lm_head still require grad is
# traced by torch.compile (AOTAutograd) with a backward, and activations may need gradients (e.g. attribution or
# adapters on a quantized base). The formula is the straight-through estimator on the activation quantizer
# (SPEC section 5 with quantize(.) read as the identity): y ~ (x T^T) W^T + b with W the dequantized weight
# (global scale included), so dx_b = (dy W)_b T_b per block b. Codes, scales, transforms and global scales are
# buffers and get no gradient; a bias that requires grad (single linears) gets the sum of dy.


@torch.library.custom_op("wush::dequantize_weight", mutates_args=())
def dequantize_weight(weight_codes: torch.Tensor, weight_scales: torch.Tensor, weight_global_scale: torch.Tensor,
                      fmt: str) -> torch.Tensor:
    """The dequantized weight in the transformed space, fp32 (N, K) (the backward's operand; opaque to tracing
    because dequantization branches on the data for NaN scales)."""
    return reference.dequantize_weight_ref(weight_codes, weight_scales, weight_global_scale, fmt)


@dequantize_weight.register_fake
def _dequantize_weight_fake(weight_codes, weight_scales, weight_global_scale, fmt):
    return weight_codes.new_empty((weight_codes.shape[0], weight_codes.shape[1] * 2), dtype=torch.float32)


def _ste_input_grad(x_meta, grads, weight_codes, weight_scales, transform, wgs, fmt):
    g = None  # (M, K) fp32, the gradient in the transformed space
    for gy, c, s, gs in zip(grads, weight_codes, weight_scales, wgs):
        if gy is None:
            continue
        w = torch.ops.wush.dequantize_weight(c, s, gs, fmt)  # (N, K) fp32
        part = gy.reshape(-1, gy.shape[-1]).to(torch.float32) @ w  # (M, K)
        g = part if g is None else g + part
    if g is None:
        return None
    nb, gsz, _ = transform.shape
    gx = torch.einsum("mbj,bjk->mbk", g.reshape(-1, nb, gsz), transform.to(torch.float32))  # g_b @ T_b
    shape, dtype = x_meta
    return gx.reshape(shape).to(dtype)


def _setup_single(ctx, inputs, output):
    x, codes, scales, transform, wgs, _ags, bias, fmt = inputs[:8]
    ctx.save_for_backward(codes, scales, transform, wgs)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.fmt = fmt
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.n_inputs = len(inputs)


def _backward_single(ctx, gy):
    codes, scales, transform, wgs = ctx.saved_tensors
    gx = _ste_input_grad(ctx.x_meta, [gy], [codes], [scales], transform, [wgs], ctx.fmt) \
        if ctx.needs_input_grad[0] else None
    gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.bias_needs_grad else None
    return (gx, None, None, None, None, None, gb) + (None,) * (ctx.n_inputs - 7)


def _setup_group(ctx, inputs, output):
    x, codes, scales, transform, wgs, _ags, biases, fmt, _kernel = inputs
    ctx.save_for_backward(transform, *codes, *scales, *wgs)
    ctx.members = len(codes)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.fmt = fmt


def _backward_group(ctx, grads):
    transform, *rest = ctx.saved_tensors
    n = ctx.members
    codes, scales, wgs = rest[:n], rest[n:2 * n], rest[2 * n:]
    gx = _ste_input_grad(ctx.x_meta, grads, codes, scales, transform, wgs, ctx.fmt) \
        if ctx.needs_input_grad[0] else None
    none = [None] * n  # list inputs take a list of gradients; the Optional[Tensor] list of biases is one leaf
    # (WushLinear's bias is a buffer: a trainable bias on a grouped layer is not supported by the op's schema)
    return gx, none, none, None, none, None, None, None, None


torch.library.register_autograd("wush::linear", _backward_single, setup_context=_setup_single)
torch.library.register_autograd("wush::fused_linear", _backward_single, setup_context=_setup_single)
torch.library.register_autograd("wush::fused_linear_group", _backward_group, setup_context=_setup_group)
