"""One layer: ``nn.Linear`` (+ its input Hessian) -> :class:`~wush_compile.modules.WushLinear`.

:func:`quantize_linear` is the per-layer entry point (benchmarks, per-layer studies); :func:`calibrate.calibrate`
drives the same functions block by block over a whole model.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from wush_compile import formats, transforms
from wush_compile.config import NVFP4_FIXED_GLOBAL_SCALE, ActScale, Format, Method, WushConfig
from wush_compile.errors import WushUserError
from wush_compile.modules import WushLinear

from .gptq import gptq_quantize, gptq_quantize_group
from .rtn import QuantizedWeight, layer_seed, rtn_quantize

logger = logging.getLogger(__name__)

__all__ = [
    "quantize_linear",
    "quantize_weight",
    "quantize_weights",
    "build_wush_linear",
    "initial_act_global_scale",
    "static_act_global_scale",
    "transformed_amax",
    "MODEL_DTYPES",
]

#: Dtypes a calibrated model may have (the transform is stored in it).
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight(weight: torch.Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if weight.dtype not in MODEL_DTYPES:
        raise TypeError(
            f"{what}: weight dtype {weight.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in MODEL_DTYPES)} (e.g. model.to(torch.float32))"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{what}: weight contains NaN or Inf; calibrate a model with finite weights")


def _check_hessian(hessian: torch.Tensor | None, k: int, what: str) -> None:
    if hessian is None:
        return
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise TypeError(f"{what}: hessian must be a floating-point tensor (K, K), got {type(hessian).__name__}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{what}: hessian must be (K, K) = ({k}, {k}), got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        bad = int((~torch.isfinite(hessian)).sum())
        raise WushUserError(
            f"{what}: hessian contains NaN or Inf ({bad} of {k * k} entries); the calibration activations of this "
            "layer are not finite: check the model weights and the calibration inputs for NaN/Inf (e.g. float16 "
            "overflow: calibrate in float32)"
        )


#: The fix of an unusable (not positive semi-definite) Hessian, in every message about one.
_HESSIAN_FIX = (
    "use more calibration tokens (nsamples x seqlen at least K), a larger damp (WushConfig(damp=...), now "
    "{damp:g}), or check the inputs for NaN/Inf"
)


def _hessian_error(hessian: torch.Tensor, config: WushConfig, what: str, exc: Exception) -> WushUserError | None:
    """When quantization failed on an input Hessian that is not positive semi-definite (a Hessian X^T X / n of
    real activations always is), the error naming the layer, the eigenvalues and the fix; None otherwise."""
    h = hessian.detach().to(torch.float64)
    lam = torch.linalg.eigvalsh((h + h.T) / 2)  # only on failure: costs nothing when quantization works
    top = float(lam.abs().max())
    if float(lam.min()) >= -1e-6 * max(top, 1e-30):
        return None
    return WushUserError(
        f"{what}: the input Hessian is not positive semi-definite (eigenvalues from {float(lam.min()):.3g} to "
        f"{float(lam.max()):.3g}), so no invertible transform exists ({exc}); " + _HESSIAN_FIX.format(damp=config.damp)
    )


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: WushConfig,
    *,
    dtype: torch.dtype | None = None,
    name: str | None = None,
    inverse_cholesky: torch.Tensor | None = None,
) -> QuantizedWeight:
    """RTN or GPTQ (``config.method``) with per-block transforms of one (N, K) weight.

    Layers that share a transform are quantized as one concatenated weight (rows stacked). GPTQ takes the
    Hessian's ``inverse_hessian_cholesky`` when the caller already has it (layers sharing an input).
    """
    what = f"layer {name}" if name else "quantize_weight"
    _check_weight(weight, what)
    n, k = weight.shape
    formats.check_group_divisible(k, config.format, what=f"{what} in_features")
    _check_hessian(hessian, k, what)
    dtype = weight.dtype if dtype is None else dtype
    seed = layer_seed(config, name)
    try:
        if config.method is Method.RTN:
            return rtn_quantize(weight, hessian, config, dtype=dtype, seed=seed)
        return gptq_quantize(
            weight, hessian, config, dtype=dtype, seed=seed, name=name, inverse_cholesky=inverse_cholesky
        )
    except RuntimeError as exc:
        err = None if hessian is None else _hessian_error(hessian, config, what, exc)
        if err is None:
            raise
        raise err from exc


def quantize_weights(
    weights: list[torch.Tensor],
    hessian: torch.Tensor | None,
    config: WushConfig,
    *,
    dtype: torch.dtype | None = None,
    names: list[str] | None = None,
) -> list[QuantizedWeight]:
    """:func:`quantize_weight` for several layers that read the same input (one Hessian), each with its own
    transforms; GPTQ runs them as one set of rows (one Python loop, one factorization of the Hessian)."""
    names = [None] * len(weights) if names is None else list(names)
    if not weights:
        return []
    k = weights[0].shape[-1]
    for wt, nm in zip(weights, names):
        what = f"layer {nm}" if nm else "quantize_weights"
        _check_weight(wt, what)
        formats.check_group_divisible(wt.shape[1], config.format, what=f"{what} in_features")
    what = f"layers {', '.join(n or '?' for n in names)}"
    _check_hessian(hessian, k, what)
    dtype = weights[0].dtype if dtype is None else dtype
    seeds = [layer_seed(config, nm) for nm in names]
    try:
        if config.method is Method.RTN:
            return [rtn_quantize(wt, hessian, config, dtype=dtype, seed=sd) for wt, sd in zip(weights, seeds)]
        return gptq_quantize_group(weights, hessian, config, dtype=dtype, seeds=seeds, names=names)
    except RuntimeError as exc:
        err = None if hessian is None else _hessian_error(hessian, config, what, exc)
        if err is None:
            raise
        raise err from exc


def initial_act_global_scale(config: WushConfig) -> float:
    """The activation global scale a layer starts with: MXFP4 1/3; NVFP4 the paper's fixed 0.1 (replaced
    by the static calibration scale when ``config.act_scale`` is STATIC and activations are observed; kept, unused,
    when it is DYNAMIC)."""
    return formats.MXFP4_GLOBAL_SCALE if config.format is Format.MXFP4 else NVFP4_FIXED_GLOBAL_SCALE


def static_act_global_scale(amax: float | torch.Tensor, headroom: float) -> torch.Tensor:
    """NVFP4 static activation scale covering ``headroom * amax``: ``headroom * amax / (448 * 6)`` (fp32 0-d)."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    if not bool(torch.isfinite(a)) or float(a) < 0:
        raise ValueError(f"activation amax must be finite and >= 0, got {float(a)}")
    return formats.nvfp4_global_scale(a * float(headroom))


def transformed_amax(x_chunks: Iterable[torch.Tensor], transform: torch.Tensor) -> torch.Tensor:
    """``max |x_b @ T_b^T|`` over activation chunks (each (..., K)): fp32 0-d."""
    amax = torch.zeros((), dtype=torch.float32)
    for x in x_chunks:
        xt = transforms.transform_activations(x.to(transform.device), transform)  # (..., K) fp32
        amax = torch.maximum(amax, xt.abs().amax().cpu())
    return amax


def build_wush_linear(
    q: QuantizedWeight,
    config: WushConfig,
    *,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device=None,
    share_group: str | None = None,
) -> WushLinear:
    """A :class:`WushLinear` holding ``q`` (buffers only, model dtype)."""
    n, k2 = q.codes.shape
    wl = WushLinear(
        k2 * 2,
        n,
        bias=bias is not None,
        fmt=config.format,
        dtype=dtype,
        device=device if device is not None else q.codes.device,
        transform_kind=config.transform,
        share_group=share_group,
        dynamic_act_scale=config.act_scale is ActScale.DYNAMIC,
    )
    with torch.no_grad():
        wl.weight_codes.copy_(q.codes)
        wl.weight_scales.copy_(q.scales)
        wl.refresh_row_exponent()
        wl.transform.copy_(q.transform)
        wl.weight_global_scale.copy_(q.global_scale.reshape(()))
        wl.act_global_scale.fill_(initial_act_global_scale(config))
        if bias is not None:
            wl.bias.copy_(bias.detach())
    wl.refresh_transform_key()  # the in-place writes above changed the values the key describes
    return wl


def quantize_linear(
    linear: nn.Linear,
    hessian: torch.Tensor | None,
    config: WushConfig,
    *,
    name: str | None = None,
    inputs: torch.Tensor | Iterable[torch.Tensor] | None = None,
) -> WushLinear:
    """Quantize one Linear with RTN or GPTQ and per-block transforms (SPEC sections 2 and 4).

    Args:
        linear: an ``nn.Linear`` (float32, bfloat16 or float16); its dtype is the model dtype.
        hessian: (K, K) ``mean_t x_t x_t^T`` of its calibration inputs; None means the identity.
        config: format, method, transform kind, damping, NVFP4 activation-scale policy.
        name: the layer's name (messages; seeds the ``random`` transform).
        inputs: calibration activations (..., K), a tensor or an iterable of chunks. Used only to set the
            NVFP4 STATIC activation global scale from the amax of the transformed activations (times
            ``config.act_headroom``). Without them that layer keeps the paper's fixed 0.1 (logged).

    Returns:
        a :class:`WushLinear` on the Linear's device, transform and bias in the Linear's dtype.
    """
    what = f"layer {name}" if name else "quantize_linear"
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{what}: expected a torch.nn.Linear, got {type(linear).__name__}")
    weight = linear.weight.detach()
    q = quantize_weight(weight, hessian, config, name=name)
    wl = build_wush_linear(q, config, bias=linear.bias, dtype=weight.dtype, device=weight.device)
    if config.format is Format.NVFP4 and config.act_scale is ActScale.STATIC:
        if inputs is None:
            logger.warning(
                "%s: NVFP4 static activation scale needs calibration inputs; using the fixed %.3g "
                "(pass inputs=... or use calibrate.calibrate)",
                what,
                NVFP4_FIXED_GLOBAL_SCALE,
            )
        else:
            chunks = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
            amax = transformed_amax(chunks, wl.transform)
            with torch.no_grad():
                wl.act_global_scale.copy_(static_act_global_scale(amax, config.act_headroom))
            wl.refresh_transform_key()
    return wl
