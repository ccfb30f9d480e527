"""Data-free quantization of a loaded model (quantize on load).

``AutoModelForCausalLM.from_pretrained(path, quantization_config=WushQuantizationConfig(method="rtn",
transform="hadamard"))`` loads the full-precision weights, then :func:`quantize_loaded` replaces every decoder
Linear of the architecture table by a :class:`WushLinear` quantized with RTN and a data-free transform
(identity, hadamard, random). The data-aware configurations (GPTQ; the wus / wush transforms) need
calibration data: :func:`check_data_free` rejects them with an error naming ``wush_compile.quantize``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from wush_compile.config import ActScale, Format, Method, WushConfig

from .architectures import decoder_layers, get_architecture
from .rtn import DATA_AWARE_KINDS

logger = logging.getLogger(__name__)

__all__ = ["check_data_free", "quantize_loaded"]

_HINT = (
    "load the model without quantization_config and calibrate it with wush_compile.quantize(model, config, "
    "dataset=..., tokenizer=...), or pass method='rtn' with transform='identity', 'hadamard' or 'random' "
    "to quantize on load"
)


def check_data_free(config: WushConfig) -> WushConfig:
    """``config`` if it needs no calibration data (NVFP4: with the fixed activation scale); else a ValueError."""
    if config.method is Method.GPTQ:
        raise ValueError(f"quantize on load: method 'gptq' needs calibration data; {_HINT}")
    if config.transform in DATA_AWARE_KINDS:
        raise ValueError(f"quantize on load: transform {config.transform.value!r} needs calibration data; {_HINT}")
    if config.format is Format.NVFP4 and config.act_scale is ActScale.STATIC:
        logger.info("quantize on load: NVFP4 without data keeps the fixed activation global scale (act_scale=fixed)")
        config = dataclasses.replace(config, act_scale=ActScale.FIXED)
    return config


@torch.no_grad()
def quantize_loaded(model: nn.Module, config: WushConfig) -> nn.Module:
    """Replace the decoder Linears of ``model`` by data-free RTN WushLinears in place; returns the model."""
    from . import pipeline

    config = check_data_free(config)
    start = time.perf_counter()
    arch = get_architecture(model)
    layers = decoder_layers(model, arch)
    report = pipeline.CalibrationReport(config=config)
    for i in tqdm(range(len(layers)), desc=f"quantize on load {config.format.value}/{config.transform.value}", unit="block"):
        block = layers[i]
        prefix = f"{arch.layers_path}.{i}"
        for members in pipeline._block_groups(block, prefix, arch.groups, config, report):
            lin0 = members[0][2]
            gname = pipeline.group_name(prefix, [p for _, p, _ in members])
            modules = pipeline._quantize_group(
                members, None, None, config, lin0.weight.dtype, lin0.weight.device, gname
            )
            for (full, path, lin), wl in zip(members, modules):
                pipeline._set_submodule(block, path, wl)
                report.layers.append(
                    pipeline.LayerRecord(full, wl.in_features, wl.out_features, math.nan, wl.share_group)
                )
    report.seconds = time.perf_counter() - start
    setattr(model, pipeline.REPORT_ATTR, report)
    logger.info("quantized on load: %d Linears (%s) in %.1f s; no data, so no layer errors",
                len(report.layers), config, report.seconds)
    return model
