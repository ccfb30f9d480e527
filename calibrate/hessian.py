"""Input second moments of a Linear: ``H = mean_t x_t x_t^T`` (SPEC section 1), accumulated in float64."""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """Accumulates ``sum_t x_t x_t^T`` over activation chunks and returns the mean.

    Each chunk's product is a float32 matmul (the expensive part) added into a float64 sum, so the
    accumulation over many chunks does not lose precision.
    """

    def __init__(self, in_features: int, device=None) -> None:
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)  # (K, K)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add activations (..., K)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator: expected (..., {self.in_features}) activations, got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features).to(device=self._sum.device, dtype=torch.float32)  # (T, K)
        self._sum += (x2.T @ x2).to(torch.float64)  # (K, K)
        self.tokens += x2.shape[0]

    def mean(self) -> torch.Tensor:
        """``sum / tokens``: (K, K) float64."""
        if self.tokens == 0:
            raise ValueError("HessianAccumulator: no activations were added; the layer never ran on calibration data")
        return self._sum / self.tokens
