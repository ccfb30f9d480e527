"""Calibration: turn a Hugging Face causal LM's Linears into WUSH-transformed FP4 layers (SPEC section 4).

- :func:`quantize_linear`: one ``nn.Linear`` (+ its input Hessian) -> :class:`wush_compile.WushLinear`.
"""

from .layer import quantize_linear

__all__ = ["quantize_linear"]
