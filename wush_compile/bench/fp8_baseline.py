"""The fp8 W8A8 baseline a user would pick instead of FP4: dynamic per-row activation scales, per-row weight
scales, ``torch._scaled_mm`` (e4m3 operands, fp32 accumulation in cuBLAS's accurate mode).

This is what torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` and vLLM's dynamic
fp8 linear compute. :func:`to_fp8` uses torchao when it is importable and works (``prefer_torchao=True``),
otherwise the in-repo :class:`Fp8Linear` below, and says which one ran.

Per row r of the activations x (M, K): ``s_r = amax(|x_r|) / 448``, ``q = e4m3(x_r / s_r)``; weights W (N, K)
likewise per output row, once. ``y = (q_x @ q_w^T) * s_x[:, None] * s_w[None, :] + b``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Fp8Linear", "to_fp8", "quantize_rows_fp8"]

#: Largest finite e4m3 (float8_e4m3fn) value.
E4M3_MAX = 448.0
#: Smallest row scale (an all-zero row must not divide by zero).
_MIN_SCALE = 1e-12
#: cuBLAS's fp8 GEMM wants N and K to be multiples of 16.
_ALIGN = 16


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, K) -> (e4m3 (R, K), fp32 row scales (R, 1)) with ``amax(row) -> 448``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(_MIN_SCALE)  # (R, 1)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # (R, K)
    return q, scale


class Fp8Linear(nn.Module):
    """Drop-in for an ``nn.Linear``: fp8 e4m3 weight with per-row scales; activations quantized per row per
    call (the cost a W8A8 user pays is included)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        n, k = linear.weight.shape
        if n % _ALIGN or k % _ALIGN:
            raise ValueError(f"Fp8Linear: N={n} and K={k} must be multiples of {_ALIGN} for the fp8 GEMM; "
                             "leave this layer in high precision")
        q, s = quantize_rows_fp8(linear.weight.detach())
        self.in_features, self.out_features = k, n
        self.register_buffer("weight_fp8", q)  # (N, K) e4m3
        self.register_buffer("weight_scale", s.reshape(1, n).contiguous())  # (1, N) fp32
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        q, s = quantize_rows_fp8(x2)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        bias = self.bias.to(out_dtype) if self.bias is not None and out_dtype != torch.float32 else None
        y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=s, scale_b=self.weight_scale, bias=bias,
                             out_dtype=out_dtype, use_fast_accum=False)  # (M, N)
        if self.bias is not None and bias is None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 e4m3 per-row"


def _decoder_linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)]


def _torchao_fp8(model: nn.Module, skip: tuple[str, ...]) -> bool:
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as exc:  # not installed, or built for another torch
        logger.info("fp8 baseline: torchao unavailable (%s: %s); the in-repo Fp8Linear runs", type(exc).__name__, exc)
        return False
    try:
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not any(
                      fqn == s or fqn.endswith("." + s) for s in skip))
    except Exception as exc:
        logger.warning("fp8 baseline: torchao quantize_ failed (%s: %s); the in-repo Fp8Linear runs",
                       type(exc).__name__, exc)
        return False
    return True


def to_fp8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), prefer_torchao: bool = False) -> str:
    """Replace every ``nn.Linear`` (except ``skip``: lm_head stays high precision, as in the wush models) by
    an fp8 W8A8 layer, in place. Returns which implementation ran: "torchao" or "in-repo"."""
    if prefer_torchao and _torchao_fp8(model, skip):
        return "torchao"
    for name, lin in _decoder_linears(model, skip):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Fp8Linear(lin))
    return "in-repo"
