"""Pure-torch twins of the runtime ops (SPEC section 5). They are the oracle for every kernel and the
CPU implementation of the custom ops. Same signatures as the ops in :mod:`wush_compile.ops.library`.
"""

from __future__ import annotations

import torch

from .. import formats
from ..config import Format
from ..transforms import transform_activations

__all__ = ["transform_quantize_ref", "fp4_gemm_ref", "linear_ref", "dequantize_weight_ref"]


def transform_quantize_ref(
    x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise transform (fp32 accumulation) then quantize: x (M, K) -> codes (M, K/2), scales (M, K/G)."""
    xt = transform_activations(x, transform)  # (M, K) fp32
    scales, g = formats.compute_scales(xt, fmt, _act_gs(act_global_scale, fmt))
    codes = formats.quantize_with_scales(xt, scales, g, fmt)  # (M, K)
    return formats.pack_fp4(codes), scales


def _act_gs(act_global_scale: torch.Tensor, fmt: str):
    # MXFP4's global scale is the format constant; the buffer holds it for uniformity.
    return None if Format.parse(fmt) is Format.MXFP4 else act_global_scale


def fp4_gemm_ref(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_global_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Block-scaled FP4 x FP4 GEMM: fp32 products of decoded codes * block scales, fp32 accumulation, then
    times the product of the two global scales, plus bias, cast to ``out_dtype``. (M, K/2) x (N, K/2) -> (M, N)."""
    one = torch.ones((), dtype=torch.float32, device=a_codes.device)
    a = formats.dequantize(a_codes, a_scales, one, fmt)  # (M, K) fp32, global scale left out
    w = formats.dequantize(w_codes, w_scales, one, fmt)  # (N, K) fp32
    acc = a @ w.t()  # (M, N) fp32
    out = acc * (a_global_scale.to(torch.float32) * w_global_scale.to(torch.float32))
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def dequantize_weight_ref(
    w_codes: torch.Tensor, w_scales: torch.Tensor, w_global_scale: torch.Tensor, fmt: str, dtype=torch.float32
) -> torch.Tensor:
    """The weight the quantized layer multiplies by, in the transformed space: (N, K)."""
    return formats.dequantize(w_codes, w_scales, w_global_scale, fmt, dtype=dtype)


def linear_ref(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    transform: torch.Tensor,
    w_global_scale: torch.Tensor,
    a_global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """The whole calibrated linear on (..., K) activations: transform, quantize, FP4 GEMM, scales, bias."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    a_codes, a_scales = transform_quantize_ref(x2, transform, a_global_scale, fmt)
    y = fp4_gemm_ref(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, x.dtype)
    return y.reshape(*lead, w_codes.shape[0])

