"""Calibration: turn a Hugging Face causal LM's Linears into WUSH-transformed FP4 layers (SPEC section 4).

- :func:`calibrate`: a whole decoder LM, block by block, in place; :func:`get_report` gives its
  :class:`CalibrationReport` (per-layer relative output errors, Linears left in high precision).
- :func:`quantize_linear`: one ``nn.Linear`` (+ its input Hessian) -> :class:`wush_compile.WushLinear`.
- :mod:`calibrate.models`, :mod:`calibrate.data`, :mod:`calibrate.evaluate`: the demo model, calibration and
  evaluation text, perplexity. ``wush quantize`` / ``wush eval`` (:mod:`calibrate.cli`) drive them.
"""

from .layer import quantize_linear
from .pipeline import CalibrationReport, LayerRecord, calibrate, get_report

__all__ = ["calibrate", "quantize_linear", "get_report", "CalibrationReport", "LayerRecord"]
