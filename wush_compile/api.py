"""``wush_compile.quantize``: one call from a model and calibration data to a calibrated model and its report."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .config import WushConfig

logger = logging.getLogger(__name__)

__all__ = ["quantize"]


def quantize(
    model: nn.Module,
    config: WushConfig | None = None,
    *,
    dataset: Any,
    tokenizer=None,
    device=None,
    batch_size: int = 8,
    text_column: str = "text",
    checkpoint_dir=None,
):
    """Calibrate ``model`` in place into WUSH FP4 layers; returns ``(model, report)``.

    Args:
        model: a Hugging Face ``*ForCausalLM`` of a supported architecture (``calibrate.architectures``).
        config: the :class:`WushConfig` (default ``WushConfig()``: MXFP4, GPTQ, WUSH); its ``nsamples`` and
            ``seqlen`` size the samples built from texts.
        dataset: a list of texts (one sample each, truncated to ``seqlen`` tokens), a text file path (cut into
            ``nsamples`` windows of ``seqlen``), a ``datasets.Dataset`` (its ``text_column``, or ``messages``
            through the tokenizer's chat template), or token ids: a (N, L) tensor, ``{"input_ids",
            "attention_mask"}``, or a list of such batches. Padded tokens (mask 0) enter no Hessian.
        tokenizer: the model's tokenizer (needed for texts, files and datasets).
        device: where to calibrate (default the model's device); another device (e.g. ``"cuda"`` for a model
            on the CPU) calibrates one decoder block at a time on it, the model staying where it is.
        batch_size: samples per forward.
        text_column: the text column of a dataset.
        checkpoint_dir: resumable calibration: every finished decoder block is saved there, and a run interrupted
            with the same model, data and config continues where it stopped, bit-identically
            (``calibrate.calibrate(checkpoint_dir=...)``, :mod:`calibrate.resume`). Delete it once the model is saved.

    Returns:
        ``(model, report)``: the calibrated model (the same object) and its ``calibrate.CalibrationReport``
        (per-layer relative output errors, Linears left in high precision, tokens, seconds).
    """
    import calibrate
    from calibrate.samples import build_batches

    config = WushConfig() if config is None else config
    if not isinstance(config, WushConfig):
        raise TypeError(f"quantize: config must be a wush_compile.WushConfig, got {type(config).__name__}")
    batches = build_batches(
        dataset, tokenizer, nsamples=config.nsamples, seqlen=config.seqlen, batch_size=batch_size,
        seed=config.seed, text_column=text_column,
    )
    calibrate.calibrate(model, batches, config, device=device, checkpoint_dir=checkpoint_dir)
    report = calibrate.get_report(model)
    logger.info("%s", report.summary())
    return model, report
