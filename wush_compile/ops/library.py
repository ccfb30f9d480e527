"""torch.library schemas of the ``wush`` namespace, their fake (meta) implementations and the CPU (torch
reference) implementations. Device kernels register further implementations in their own modules.

``wush::linear`` is what a calibrated module's eager forward calls, so every buffer is a graph input and
the FX pass can find and rewrite it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import Format
from . import reference

__all__ = ["linear", "check_linear_args"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_linear_args(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    transform: torch.Tensor,
    w_global_scale: torch.Tensor,
    a_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
) -> Format:
    """Validate a calibrated linear's inputs with errors that name the value and the fix (runs at trace time)."""
    f = Format.parse(fmt)
    g = f.group_size
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"wush linear: activations must be float32, bfloat16 or float16, got {x.dtype}; cast the input")
    if x.dim() < 1:
        raise ValueError("wush linear: activations need at least one dimension (..., K)")
    for name, t, dt in (("weight_codes", w_codes, torch.uint8), ("weight_scales", w_scales, torch.uint8)):
        if t.dtype != dt or t.dim() != 2:
            raise TypeError(f"wush linear: {name} must be a 2-D {dt} tensor, got {t.dtype} of shape {tuple(t.shape)}")
    n, k2 = w_codes.shape
    k = k2 * 2
    if x.shape[-1] != k:
        raise ValueError(
            f"wush linear: input has K={x.shape[-1]} features but the layer was calibrated for K={k}; "
            "feed activations of the layer's in_features"
        )
    if tuple(w_scales.shape) != (n, k // g):
        raise ValueError(f"wush linear: weight_scales must be {(n, k // g)} for {f.value}, got {tuple(w_scales.shape)}")
    if tuple(transform.shape) != (k // g, g, g):
        raise ValueError(f"wush linear: transform must be {(k // g, g, g)}, got {tuple(transform.shape)}")
    if not transform.is_floating_point():
        raise TypeError(f"wush linear: transform must be floating point, got {transform.dtype}")
    for name, t in (("weight_global_scale", w_global_scale), ("act_global_scale", a_global_scale)):
        if t.numel() != 1 or t.dtype != torch.float32:
            raise TypeError(f"wush linear: {name} must be an fp32 scalar, got {t.dtype} of shape {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"wush linear: bias must be ({n},), got {tuple(bias.shape)}")
    tensors = [("weight_codes", w_codes), ("weight_scales", w_scales), ("transform", transform)]
    if bias is not None:
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(
                f"wush linear: input is on {x.device} but {name} is on {t.device}; move the model and inputs "
                "to the same device"
            )
    return f


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
