"""The operands of one calibrated linear, checked once per op call and passed down as one frozen value.

An op (:mod:`.library`) builds a :class:`LinearOperands` with :meth:`LinearOperands.checked` (the errors of
:func:`.checks.check_linear_args`, naming the value and the fix), the router (:mod:`.dispatch`) picks a route
from it, and the backends (:mod:`.kernels`, :mod:`wush_compile.cuda`) run it without checking or parsing the
format again. The two global scales are called ``weight_global_scale`` and ``act_global_scale`` everywhere a
bundle is involved (the op schemas' names).

A leaf module like :mod:`.checks`: it imports only the config and the checks, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..config import Format
from .checks import check_linear_args

__all__ = ["LinearOperands"]


@dataclasses.dataclass(frozen=True)
class LinearOperands:
    """A calibrated linear's weight-side operands and parsed format (everything but the activations).

    Fields:
        weight_codes: (N, K/2) uint8, two e2m1 codes per byte.
        weight_scales: (N, K/G) uint8 block scales (e8m0 for MXFP4, e4m3 for NVFP4).
        transform: (K/G, G, G) float, the per-block transform applied to the activations.
        weight_global_scale: (1,) or () fp32.
        act_global_scale: (1,) or () fp32 (MXFP4 runs its fixed 1/3 whatever this holds).
        bias: (N,) or None.
        fmt: the parsed :class:`~wush_compile.config.Format`.
    """

    weight_codes: torch.Tensor
    weight_scales: torch.Tensor
    transform: torch.Tensor
    weight_global_scale: torch.Tensor
    act_global_scale: torch.Tensor
    bias: Optional[torch.Tensor]
    fmt: Format

    @classmethod
    def checked(
        cls,
        x: torch.Tensor,
        weight_codes: torch.Tensor,
        weight_scales: torch.Tensor,
        transform: torch.Tensor,
        weight_global_scale: torch.Tensor,
        act_global_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        fmt: str | Format,
        op: str = "wush linear",
    ) -> "LinearOperands":
        """Check the operands against activations ``x`` (..., K) once and bundle them (errors name ``op``)."""
        f = check_linear_args(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias,
                              fmt, op=op)
        return cls(weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, f)

    @property
    def n(self) -> int:
        """Output features."""
        return self.weight_codes.shape[0]

    @property
    def k(self) -> int:
        """Input features."""
        return self.weight_codes.shape[1] * 2

    def contiguous(self) -> "LinearOperands":
        """The same operands with contiguous codes, scales and transform (what the kernels read)."""
        return dataclasses.replace(
            self, weight_codes=self.weight_codes.contiguous(), weight_scales=self.weight_scales.contiguous(),
            transform=self.transform.contiguous(),
        )

    def args(self) -> tuple:
        """(weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt value): the
        positional arguments of the torch twins (:func:`wush_compile.ops.reference.linear_ref` after x)."""
        return (self.weight_codes, self.weight_scales, self.transform, self.weight_global_scale,
                self.act_global_scale, self.bias, self.fmt.value)


def group_operands(
    x: torch.Tensor,
    weight_codes: Sequence[torch.Tensor],
    weight_scales: Sequence[torch.Tensor],
    transform: torch.Tensor,
    weight_global_scales: Sequence[torch.Tensor],
    act_global_scale: torch.Tensor,
    biases: Sequence[Optional[torch.Tensor]],
    fmt: str | Format,
    op: str = "wush fused_linear_group",
) -> tuple[LinearOperands, ...]:
    """One checked :class:`LinearOperands` per member of a group sharing x, the transform and the act scale."""
    n = len(weight_codes)
    if n == 0 or not (len(weight_scales) == len(weight_global_scales) == len(biases) == n):
        raise ValueError(
            f"{op}: needs one weight_codes, weight_scales, weight_global_scale and bias (or None) per member; got "
            f"{len(weight_codes)}, {len(weight_scales)}, {len(weight_global_scales)}, {len(biases)}"
        )
    f = Format.parse(fmt)
    return tuple(
        LinearOperands.checked(x, weight_codes[i], weight_scales[i], transform, weight_global_scales[i],
                               act_global_scale, biases[i], f, op=f"{op} member {i}")
        for i in range(n)
    )
