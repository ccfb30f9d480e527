"""Round-to-nearest weight quantization with per-block transforms (SPEC sections 2-4).

Every block is independent: ``T_b`` from (W_b, H_b), rounded to the model dtype, then ``W_b @ inv(T_b)``
(computed from the ROUNDED T) quantized with the format's own scales.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from wush_compile import formats, transforms
from wush_compile.config import Format, TransformKind, WushConfig

from ._threads import single_thread

__all__ = ["QuantizedWeight", "layer_seed", "layer_transforms", "weight_global_scale", "rtn_quantize"]

#: Transform kinds that look at the data (the others are fixed per block size and seed).
DATA_AWARE_KINDS = (TransformKind.WUS, TransformKind.WUSH)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight matrix as the runtime stores it (SPEC section 5)."""

    codes: torch.Tensor  # (N, K/2) uint8, packed e2m1 codes of W' = W_b @ inv(T_b)
    scales: torch.Tensor  # (N, K/G) uint8 block scales (e8m0 or e4m3)
    transform: torch.Tensor  # (K/G, G, G) in the model dtype: the exact T the runtime applies
    global_scale: torch.Tensor  # () fp32

    def dequantize(self, fmt: Format) -> torch.Tensor:
        """Effective weight in the original space ``dequant(W') @ T`` blockwise: (N, K) float64."""
        wq = formats.dequantize(self.codes, self.scales, self.global_scale, fmt).to(torch.float64)  # (N, K)
        nb, g, _ = self.transform.shape
        wb = wq.reshape(wq.shape[0], nb, g)  # (N, K/G, G)
        return torch.einsum("nbh,bhg->nbg", wb, self.transform.to(torch.float64)).reshape(wq.shape)


def layer_seed(config: WushConfig, name: str | None) -> int:
    """Seed of a layer's random transform: the config seed mixed with a stable hash of the layer name."""
    return (config.seed * 1_000_003 + zlib.crc32((name or "").encode())) % (2**31)


def layer_transforms(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: WushConfig,
    dtype: torch.dtype,
    seed: int = 0,
) -> torch.Tensor:
    """The layer's per-block transforms, float64 algebra, rounded to ``dtype``: (K/G, G, G)."""
    with single_thread():
        t64 = transforms.block_transforms(
            config.transform, weight, hessian, config.group_size, seed=seed, rel_damp=config.damp
        )  # (K/G, G, G) float64
        return transforms.round_transform(t64, dtype)


def weight_global_scale(w_transformed: torch.Tensor, fmt: Format) -> torch.Tensor | None:
    """The weight's global scale: None for MXFP4 (the format constant), ``amax(W') / (448 * 6)`` for NVFP4."""
    return None if fmt is Format.MXFP4 else formats.nvfp4_global_scale(w_transformed)


def rtn_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: WushConfig,
    *,
    dtype: torch.dtype,
    seed: int = 0,
) -> QuantizedWeight:
    """RTN with per-block transforms.

    Args:
        weight: (N, K) full-precision weight.
        hessian: (K, K) input second moment ``mean x x^T`` (None: identity).
        config: format and transform kind (``config.method`` is not looked at).
        dtype: the model dtype the transform is rounded to.
        seed: seeds the ``random`` transform.
    """
    t = layer_transforms(weight, hessian, config, dtype, seed)  # (K/G, G, G) model dtype
    with single_thread():
        w_t = transforms.transform_weight(weight, t)  # (N, K) float64, from the ROUNDED T
    codes, scales, g = formats.quantize(w_t, config.format, weight_global_scale(w_t, config.format))
    return QuantizedWeight(codes=codes, scales=scales, transform=t, global_scale=g)
