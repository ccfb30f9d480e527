"""The vLLM classes of the ``wush`` quantization method (imported only by :func:`wush_compile.vllm.register`).

- :class:`WushVllmConfig` (``QuantizationConfig``): reads config.json's ``quantization_config``, verifies the
  checkpoint files before any weight is read (:func:`wush_compile.vllm._core.verify_checkpoint_dir`), hands every
  quantized Linear a :class:`WushLinearMethod` and the rest vLLM's unquantized method, and drops the tensors vLLM
  does not load (guards, row exponents, the integrity tensor) from the weight stream.
- :class:`WushLinearMethod` (``LinearMethodBase``): per layer (one module, or a fused q/k/v / gate/up)
  ``weight_codes`` / ``weight_scales`` as vLLM ``ModelWeightParameter`` / ``GroupQuantScaleParameter`` (vLLM's
  loaders place each member's rows and cut the tensor-parallel shards: N for column-parallel layers, K for
  row-parallel ones, where K/tp must hold whole blocks of G), the global scales as ``PerTensorScaleParameter``
  (one per member), and the per-block transforms as one ``(members, K/G, G, G)`` parameter with its own loader
  (member by shard id, this rank's blocks for a row-parallel layer).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (
    WEIGHT_LOADER_V2_SUPPORTED,
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from .. import hf
from . import _core

logger = logging.getLogger(__name__)

QUANT_METHOD = hf.QUANT_METHOD


class WushVllmConfig(QuantizationConfig):
    """vLLM's view of a wush checkpoint's ``quantization_config``."""

    def __init__(self, qconfig: "hf.WushQuantizationConfig") -> None:
        super().__init__()
        self.qconfig = qconfig
        self._verified: Optional[str] = None

    def __repr__(self) -> str:
        return f"WushVllmConfig(format={self.qconfig.format}, modules={len(self.qconfig.modules)})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the reference path runs anywhere; the GPU kernels pick themselves at run time

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "WushVllmConfig":
        return cls(_core.load_config_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        """Verify the checkpoint files once, before vLLM reads any weight (vLLM calls this with the model path)."""
        model_dir = _local_dir(model_name, revision)
        if self._verified != model_dir:
            _core.verify_checkpoint_dir(model_dir, self.qconfig)
            self._verified = model_dir

    def get_checkpoint_weight_mapper(self):
        from vllm.model_executor.models.utils import WeightsMapper

        mapper = super().get_checkpoint_weight_mapper()
        return mapper | WeightsMapper(orig_to_new_regex={_core.dropped_tensor_pattern(self.qconfig): None})

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            spec = _core.layer_spec(self.qconfig, prefix, self.packed_modules_mapping or None)
            if spec is None:
                return UnquantizedLinearMethod()
            return WushLinearMethod(spec)
        if prefix in self.qconfig.modules:
            raise hf.CheckpointError(
                f"config.json quantization_config lists '{prefix}' as a quantized Linear, but vLLM builds it as a "
                f"{type(layer).__name__}; only the decoder blocks' Linears are served quantized (a quantized "
                "lm_head is not supported in vLLM - calibrate without it)"
            )
        return None


def _local_dir(model_name: str, revision: Optional[str]) -> str:
    if os.path.isdir(model_name):
        return model_name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_name, revision=revision, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - not in the local cache: say what is needed
        raise hf.CheckpointError(
            f"{model_name}: the wush checkpoint must be a local directory (or in the local Hugging Face cache) so "
            f"its integrity can be checked before serving ({type(err).__name__}: {err})"
        ) from err


def _transform_loader(spec: "_core.LayerSpec", k_local: int):
    """Loader of the ``(members, K_local/G, G, G)`` transform parameter: the member by shard id, this rank's blocks
    of a row-parallel layer."""
    nb = k_local // spec.group_size

    def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        i = _core.member_index(shard_id, len(spec.members), spec.prefix)
        if loaded.dim() != 3 or loaded.shape[1:] != param.data.shape[2:]:
            raise hf.CheckpointError(
                f"vLLM layer '{spec.prefix}': transform of shape {list(loaded.shape)} does not have blocks of "
                f"{spec.group_size}x{spec.group_size}"
            )
        if loaded.shape[0] != nb:  # row-parallel: this rank's blocks
            rank = getattr(param, "tp_rank", 0)
            loaded = loaded.narrow(0, rank * nb, nb)
        param.data[i].copy_(loaded)

    return load


class WushLinearMethod(LinearMethodBase):
    """One vLLM linear layer (a module or a fused q/k/v / gate/up) stored as wush buffers."""

    def __init__(self, spec: "_core.LayerSpec") -> None:
        self.spec = spec

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        spec = self.spec
        output_sizes = getattr(layer, "output_sizes", None) or [output_size]
        if len(output_sizes) == len(spec.members):
            _core.check_layer_sizes(spec, input_size, output_sizes)
        k = _core.local_k(spec, input_size, input_size_per_partition)
        g = spec.group_size
        n = sum(output_partition_sizes)
        members = len(spec.members)
        loader = extra_weight_attrs["weight_loader"]
        codes = ModelWeightParameter(data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, output_dim=0,
                                     weight_loader=loader)
        scales = GroupQuantScaleParameter(data=torch.empty(n, k // g, dtype=torch.uint8), input_dim=1,
                                          output_dim=0, weight_loader=loader)
        transform = BasevLLMParameter(data=torch.empty(members, k // g, g, g, dtype=spec.dtype),
                                      weight_loader=_transform_loader(spec, k))
        wgs = PerTensorScaleParameter(data=torch.full((members,), float("nan"), dtype=torch.float32),
                                      weight_loader=loader)
        ags = PerTensorScaleParameter(data=torch.full((members,), float("nan"), dtype=torch.float32),
                                      weight_loader=loader)
        for name, p in (("weight_codes", codes), ("weight_scales", scales), ("transform", transform),
                        ("weight_global_scale", wgs), ("act_global_scale", ags)):
            layer.register_parameter(name, p)
        layer.wush_sizes = tuple(int(s) for s in output_partition_sizes)

    def process_weights_after_loading(self, layer) -> None:
        spec = self.spec
        for name in ("weight_global_scale", "act_global_scale"):
            v = getattr(layer, name).data
            bad = ~(torch.isfinite(v) & (v > 0))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise hf.CheckpointError(
                    f"tensor '{spec.members[i]}.{name}' is {float(v[i])}; a global scale must be finite and > 0 "
                    "(or it was not loaded from the checkpoint)"
                )
        for name in ("weight_codes", "weight_scales", "transform", "weight_global_scale", "act_global_scale"):
            data = getattr(layer, name).data
            delattr(layer, name)
            layer.register_parameter(name, Parameter(data, requires_grad=False))
        layer.wush_plan = _core.plan_forward(layer.transform.data, layer.act_global_scale.data,
                                             layer.weight_global_scale.data, layer.wush_sizes)
        logger.debug("wush: %s runs as %s", spec.prefix, layer.wush_plan.mode)

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _core.forward(layer.wush_plan, x, layer.weight_codes, layer.weight_scales, layer.transform,
                             layer.weight_global_scale, layer.act_global_scale, bias, self.spec.fmt.value)


def register() -> None:
    """Register ``wush`` with vLLM (idempotent: vLLM loads plugins in every process, maybe more than once)."""
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        _CUSTOMIZED_METHOD_TO_QUANT_CONFIG,
        register_quantization_config,
    )

    if WushLinearMethod.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
        WEIGHT_LOADER_V2_SUPPORTED.append(WushLinearMethod.__name__)
    current = _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(QUANT_METHOD)
    if QUANT_METHOD in QUANTIZATION_METHODS and current is WushVllmConfig:
        return
    register_quantization_config(QUANT_METHOD)(WushVllmConfig)
    logger.debug("wush: quantization method registered with vLLM")
