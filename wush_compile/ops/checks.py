"""Argument checks of the calibrated-linear ops: errors that name the value and the fix.

A leaf module (it imports only the config): the op schemas (:mod:`.library`) and the backends (the Triton
launchers of :mod:`.kernels`, the CUTLASS ops of :mod:`wush_compile.cuda`) validate with the same functions
without importing one another.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import Format, KernelChoice

__all__ = ["check_linear_args", "check_quantize_args", "check_gemm_args", "check_kernel_arg", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ checks


def _check_scalar(name: str, t: torch.Tensor, op: str) -> None:
    if t.numel() != 1 or t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be an fp32 scalar, got {t.dtype} of shape {tuple(t.shape)}")


def _check_same_device(op: str, ref_name: str, ref: torch.Tensor, tensors) -> None:
    for name, t in tensors:
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{op}: {ref_name} is on {ref.device} but {name} is on {t.device}; move the model and inputs "
                "to the same device"
            )


def _check_activation(op: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: activations must be float32, bfloat16 or float16, got {x.dtype}; cast the input "
            "(e.g. x.to(torch.bfloat16))"
        )
    if x.dim() < 1:
        raise ValueError(f"{op}: activations need at least one dimension (..., K)")


def _check_transform(op: str, transform: torch.Tensor, k: int, f: Format) -> None:
    g = f.group_size
    if not transform.is_floating_point():
        raise TypeError(f"{op}: transform must be floating point, got {transform.dtype}")
    if tuple(transform.shape) != (k // g, g, g):
        raise ValueError(
            f"{op}: transform must be {(k // g, g, g)} for K={k} and {f.value} (G={g}), got {tuple(transform.shape)}"
        )


def check_linear_args(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    transform: torch.Tensor,
    w_global_scale: torch.Tensor,
    a_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    op: str = "wush linear",
) -> Format:
    """Validate a calibrated linear's inputs with errors that name the value and the fix (runs at trace time)."""
    f = Format.parse(fmt)
    g = f.group_size
    _check_activation(op, x)
    for name, t, dt in (("weight_codes", w_codes, torch.uint8), ("weight_scales", w_scales, torch.uint8)):
        if t.dtype != dt or t.dim() != 2:
            raise TypeError(f"{op}: {name} must be a 2-D {dt} tensor, got {t.dtype} of shape {tuple(t.shape)}")
    n, k2 = w_codes.shape
    k = k2 * 2
    if x.shape[-1] != k:
        raise ValueError(
            f"{op}: input has K={x.shape[-1]} features but the layer was calibrated for K={k}; "
            "feed activations of the layer's in_features"
        )
    if tuple(w_scales.shape) != (n, k // g):
        raise ValueError(f"{op}: weight_scales must be {(n, k // g)} for {f.value}, got {tuple(w_scales.shape)}")
    _check_transform(op, transform, k, f)
    _check_scalar("weight_global_scale", w_global_scale, op)
    _check_scalar("act_global_scale", a_global_scale, op)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must be ({n},), got {tuple(bias.shape)}")
    _check_same_device(
        op,
        "input",
        x,
        [
            ("weight_codes", w_codes),
            ("weight_scales", w_scales),
            ("transform", transform),
            ("weight_global_scale", w_global_scale),
            ("act_global_scale", a_global_scale),
            ("bias", bias),
        ],
    )
    return f


def check_quantize_args(x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str) -> Format:
    """Validate wush::transform_quantize inputs (trace time)."""
    op = "wush transform_quantize"
    f = Format.parse(fmt)
    _check_activation(op, x)
    k = x.shape[-1]
    if k % f.group_size:
        raise ValueError(
            f"{op}: K={k} is not a multiple of the {f.value} group size G={f.group_size}; pad K or leave the "
            "tensor in high precision"
        )
    _check_transform(op, transform, k, f)
    _check_scalar("act_global_scale", act_global_scale, op)
    _check_same_device(op, "input", x, [("transform", transform), ("act_global_scale", act_global_scale)])
    return f


def check_gemm_args(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_global_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    out_dtype: torch.dtype,
) -> Format:
    """Validate wush::fp4_gemm inputs (trace time)."""
    op = "wush fp4_gemm"
    f = Format.parse(fmt)
    g = f.group_size
    for name, t in (("a_codes", a_codes), ("a_scales", a_scales), ("w_codes", w_codes), ("w_scales", w_scales)):
        if t.dtype != torch.uint8 or t.dim() != 2:
            raise TypeError(f"{op}: {name} must be a 2-D uint8 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    m, ka = a_codes.shape
    n, kw = w_codes.shape
    if ka != kw:
        raise ValueError(
            f"{op}: activation codes hold K={2 * ka} values per row but the weight codes hold K={2 * kw}; "
            "quantize the activations for this layer's in_features"
        )
    k = 2 * kw
    if tuple(a_scales.shape) != (m, k // g) or tuple(w_scales.shape) != (n, k // g):
        raise ValueError(
            f"{op}: {f.value} scales must be {(m, k // g)} (activations) and {(n, k // g)} (weights), got "
            f"{tuple(a_scales.shape)} and {tuple(w_scales.shape)}"
        )
    _check_scalar("a_global_scale", a_global_scale, op)
    _check_scalar("w_global_scale", w_global_scale, op)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must be ({n},), got {tuple(bias.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    _check_same_device(
        op,
        "a_codes",
        a_codes,
        [("a_scales", a_scales), ("a_global_scale", a_global_scale), ("w_codes", w_codes), ("w_scales", w_scales),
         ("w_global_scale", w_global_scale), ("bias", bias)],
    )
    return f


def check_kernel_arg(kernel: str, op: str) -> KernelChoice:
    try:
        return KernelChoice.parse(kernel)
    except ValueError as exc:
        raise ValueError(f"{op}: kernel: {exc}") from None
