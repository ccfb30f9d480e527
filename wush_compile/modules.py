"""The calibrated layer: buffers only (SPEC section 5), eager forward through ``torch.ops.wush.linear``."""

from __future__ import annotations

import hashlib
import sys

import torch
from torch import nn

from . import formats, transforms
from .config import Format, TransformKind
from .errors import WushUserError
from .ops import library as _ops  # noqa: F401  (registers torch.ops.wush.linear)

__all__ = ["WushLinear", "content_key", "key_is_current"]

#: Buffers whose VALUES the compiler's decisions depend on (the grouping pass compares them across layers).
KEYED_BUFFERS = ("transform", "act_global_scale")
#: Attribute of a layer's ``transform`` tensor holding the key computed from it (checked by the grouping pass).
TENSOR_KEY_ATTR = "_wush_key"
_UNSET_KEY = "unset"


def content_key(transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str) -> str:
    """A digest of the values the compiler groups layers by: transform and activation scale (bytes, dtype,
    shape) and the format. Equal keys mean equal values; a meta tensor has no values (key ``"unset"``)."""
    h = hashlib.blake2b(fmt.encode(), digest_size=12)
    for t in (transform, act_global_scale):
        if t.device.type == "meta":
            return _UNSET_KEY
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def key_is_current(transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str) -> bool:
    """Whether the key stored with ``transform`` (by :meth:`WushLinear.refresh_transform_key`) still describes
    these values (False after an in-place edit without a refresh, or for a tensor no WushLinear keyed)."""
    stored = getattr(transform, TENSOR_KEY_ATTR, None)
    return stored is not None and stored != _UNSET_KEY and stored == content_key(transform, act_global_scale, fmt)


class WushLinear(nn.Module):
    """A Linear stored as packed FP4 codes, block scales, per-block transforms and global scales.

    Buffers (all part of the state dict):
        weight_codes        (N, K/2) uint8   transformed weight W' = W_b @ inv(T_b), e2m1 codes packed
        weight_scales       (N, K/G) uint8   e8m0 (MXFP4) or e4m3 (NVFP4) block scales
        transform           (K/G, G, G)      T_b in the model dtype
        weight_global_scale ()  fp32
        act_global_scale    ()  fp32         MXFP4: 1/3; NVFP4: static calibration scale or 0.1
        bias                (N,) optional, model dtype
        weight_row_exponent (N,) int16           MXFP4 only: the largest e8m0 scale byte of each weight row
                                                 (:func:`formats.mx_row_reference_exponent`; NaN bytes excluded,
                                                 -1 for a row without a finite scale); None for NVFP4

    Attributes (not tensors; saved in the checkpoint config): ``fmt``, ``transform_kind``, ``share_group`` (name
    of the group of layers that read the same input with an identical transform, or None), ``dynamic_act_scale``
    (NVFP4 only: each call quantizes its activations with the global scale ``amax(x_b @ T_b^T) / (448 * 6)`` of
    that call's transformed input instead of the static ``act_global_scale``, so inputs far above the
    calibration range do not saturate; costs one more transform and reduction per call, and a row's result
    then depends on the other rows of the call).

    ``transform_key`` (not saved; recomputed): a digest of ``transform`` and ``act_global_scale``
    (:func:`content_key`). Why it exists: ``torch.compile`` makes the module buffers graph INPUTS, so a second
    model of the same architecture reuses the first one's compiled graph as long as dynamo's guards (shapes,
    dtypes, module structure, constant attributes) pass - buffer values are not guarded. The grouping pass
    decides from values (which layers share one transform), so that decision must be guarded: ``forward``
    branches on ``transform_key``, a string attribute, and dynamo guards a branch on a module's constant
    attribute by value. A model whose transforms differ fails the guard and is recompiled (a model with equal
    transforms has equal keys and reuses the graph). The key is refreshed whenever these buffers are assigned
    (``setattr``, which is how transformers loads them, ``load_state_dict``), converted (``.to``), and by the
    calibration code after its in-place writes. After editing the buffers in place yourself, call
    :meth:`refresh_transform_key` (an eager forward also does, and the grouping pass refuses to group a layer
    whose key no longer matches its values).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        fmt: Format | str = Format.MXFP4,
        dtype: torch.dtype = torch.float32,
        device=None,
        transform_kind: TransformKind | str = TransformKind.WUSH,
        share_group: str | None = None,
        dynamic_act_scale: bool = False,
    ) -> None:
        super().__init__()
        fmt = Format.parse(fmt)
        if not isinstance(dynamic_act_scale, bool):
            raise TypeError(f"WushLinear: dynamic_act_scale must be True or False, got {dynamic_act_scale!r}")
        if dynamic_act_scale and fmt is not Format.NVFP4:
            raise ValueError(
                f"WushLinear: dynamic_act_scale applies to NVFP4 only ({fmt.value} activation scales are per-block "
                "powers of two and need no global scale); pass dynamic_act_scale=False"
            )
        formats.check_group_divisible(in_features, fmt, what="WushLinear in_features")
        g = fmt.group_size
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.transform_kind = TransformKind.parse(transform_kind)
        self.share_group = share_group
        self.dynamic_act_scale = dynamic_act_scale
        kw = dict(device=device)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        self.register_buffer("weight_scales", torch.zeros(out_features, in_features // g, dtype=torch.uint8, **kw))
        self.register_buffer("transform", torch.zeros(in_features // g, g, g, dtype=dtype, **kw))
        self.register_buffer("weight_global_scale", torch.ones((), dtype=torch.float32, **kw))
        self.register_buffer("act_global_scale", torch.ones((), dtype=torch.float32, **kw))
        if fmt is Format.MXFP4:
            self.register_buffer("weight_row_exponent", torch.full((out_features,), -1, dtype=torch.int16, **kw))
        else:
            self.weight_row_exponent = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        self.refresh_transform_key()

    def refresh_transform_key(self) -> str:
        """Recompute :attr:`transform_key` from the current buffer values (see the class docstring)."""
        key = content_key(self.transform, self.act_global_scale, self.fmt.value)
        self.__dict__["transform_key"] = key
        self.__dict__["_key_versions"] = self._versions()
        try:
            setattr(self.transform, TENSOR_KEY_ATTR, key)
        except (AttributeError, RuntimeError):  # a tensor that cannot carry attributes: the pass will not group it
            pass
        return key

    def _versions(self) -> tuple:
        try:
            return tuple(self._buffers[n]._version for n in KEYED_BUFFERS)
        except (RuntimeError, AttributeError):  # inference tensors track no version
            return ()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in KEYED_BUFFERS and all(n in self._buffers for n in KEYED_BUFFERS) and "fmt" in self.__dict__:
            self.refresh_transform_key()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_transform_key()

    _FP32_BUFFERS = ("weight_global_scale", "act_global_scale")

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` / ``.half()`` may change the model dtype (transform, bias), but the global
        # scales are fp32 by definition (SPEC section 5): keep their exact fp32 values and follow only the device.
        saved = {name: self._buffers.get(name) for name in self._FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        self.refresh_transform_key()  # a dtype change rounds the transform
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _check_not_saved_plain(self, prefix)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def refresh_row_exponent(self) -> None:
        """Recompute ``weight_row_exponent`` from ``weight_scales`` (MXFP4; a no-op for NVFP4). Call after the
        scales change."""
        if self.weight_row_exponent is not None:
            with torch.no_grad():
                self.weight_row_exponent = formats.mx_row_reference_exponent(self.weight_scales)

    @property
    def group_size(self) -> int:
        return self.fmt.group_size

    @property
    def dtype(self) -> torch.dtype:
        return self.transform.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self._versions() != self._key_versions:
            self.refresh_transform_key()  # buffers edited in place since the key was computed (eager only)
        # Read in a branch so that dynamo guards on its value (see the class docstring); never taken.
        if not self.transform_key:
            raise RuntimeError("WushLinear.transform_key is empty; call refresh_transform_key()")
        return torch.ops.wush.linear(
            x,
            self.weight_codes,
            self.weight_scales,
            self.transform,
            self.weight_global_scale,
            self.call_act_global_scale(x),
            self.bias,
            self.fmt.value,
        )

    def call_act_global_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The activation global scale a call on ``x`` quantizes with: the ``act_global_scale`` buffer, or with
        ``dynamic_act_scale`` the NVFP4 scale of this call's transformed input (finite values; 1.0 when all are 0)."""
        if not self.dynamic_act_scale:
            return self.act_global_scale
        xt = transforms.transform_activations(x.detach(), self.transform)  # (..., K) fp32
        return formats.nvfp4_global_scale(xt)  # () fp32

    def dequantized_weight(self) -> torch.Tensor:
        """The effective weight in the original space, ``dequant(W') @ T`` blockwise, fp32 (N, K)."""
        w_t = formats.dequantize(self.weight_codes, self.weight_scales, self.weight_global_scale, self.fmt)  # (N, K)
        nb, g, _ = self.transform.shape
        wb = w_t.reshape(self.out_features, nb, g)  # (N, K/G, G)
        return torch.einsum("nbh,bhg->nbg", wb, self.transform.float()).reshape(self.out_features, -1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={self.fmt.value}, transform={self.transform_kind.value}"
            + (f", share_group={self.share_group}" if self.share_group else "")
            + (", dynamic_act_scale=True" if self.dynamic_act_scale else "")
        )


def _save_pretrained_caller():
    """The model whose ``PreTrainedModel.save_pretrained`` is on the call stack (None when none is)."""
    mu = sys.modules.get("transformers.modeling_utils")
    if mu is None:
        return None
    import inspect

    code = inspect.unwrap(mu.PreTrainedModel.save_pretrained).__code__
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None


def _check_not_saved_plain(layer: WushLinear, prefix: str) -> None:
    """``save_pretrained`` of a model holding WushLinears that nothing marked as a wush model (layers assembled by
    hand, without ``wush_compile.hf.attach``) would write a checkpoint without ``quantization_config`` that loads with
    randomly initialized Linears: refuse it. A model that ``calibrate()``, quantize-on-load or loading marked (its
    ``hf_quantizer`` is the wush quantizer, whose hook builds the state dict) saves as usual."""
    model = _save_pretrained_caller()
    if model is None:
        return
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) == "wush":
        return
    raise WushUserError(
        f"save_pretrained: {type(model).__name__} holds WushLinear layers (e.g. {prefix.rstrip('.') or 'the model'}) "
        "but is not marked as a wush model, so its checkpoint would carry no quantization_config and load with "
        "randomly initialized Linears; call wush_compile.hf.attach(model, config) before save_pretrained, or save "
        "with wush_compile.hf.save_pretrained(model, directory, config) (calibrate() and wush_compile.quantize() "
        "attach it themselves). Nothing but config.json / generation_config.json was written to the directory"
    )
