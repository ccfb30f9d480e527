"""Tensor parallelism for wush models through ``torch.distributed.tensor.parallel``.

``parallelize_module`` with the two styles here shards :class:`~wush_compile.modules.WushLinear` layers (and plain
``nn.Linear`` ones, for a high-precision baseline under the same plan) into **plain local tensors**: the FX pass and
the ops see an ordinary, smaller ``wush.linear``; the collectives are functional collectives in forward hooks, so
``torch.compile(backend="wush", fullgraph=True)`` traces them into the graph.

- :class:`WushColwiseParallel` (N split): rank r keeps output rows ``[r*N/tp, (r+1)*N/tp)`` of codes, scales and
  bias; transform and global scales are whole. Output: the local column shard (or all-gathered, ``gather_output``).
- :class:`WushRowwiseParallel` (K split, in whole blocks of G): rank r keeps input columns
  ``[r*K/tp, (r+1)*K/tp)``: codes columns ``K/(2 tp)``, scale columns and transform blocks ``K/(G tp)``; global
  scales replicated. Every block's transform, codes and scales stay intact, so the sharded layer needs no
  re-quantization: each rank quantizes its slice of x exactly as the whole layer would. The partial outputs are
  summed with an all-reduce; the bias is added once, after the reduce.

:func:`parallelize` applies the model's own transformers ``base_model_tp_plan`` (Llama: q/k/v and gate/up
column-wise, o and down row-wise) with these styles. Attention needs no change: transformers' Llama attention views
q/k/v as ``(..., -1, head_dim)``, so each rank runs its ``heads/tp`` query and ``kv_heads/tp`` key/value heads.
Embeddings, norms and lm_head stay replicated.

:func:`load_sharded` builds the model on the meta device, shards it, and reads each rank's slices straight from the
safetensors files (``safe_open(...).get_slice``); no rank reads a whole quantized tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from .modules import WushLinear

logger = logging.getLogger(__name__)

__all__ = [
    "WushColwiseParallel",
    "WushRowwiseParallel",
    "ShardError",
    "row_shard_width",
    "tp_plan",
    "parallelize",
    "load_sharded",
    "TP_ATTR",
]

#: Attribute a sharded module carries: its :class:`ShardInfo`.
TP_ATTR = "_wush_tp"
#: Row-parallel layers keep their bias under this buffer name (added after the all-reduce).
ROW_BIAS = "tp_bias"


class ShardError(ValueError):
    """A layer or model that cannot be split over the requested tensor-parallel size."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """How one module was sharded: ``slices[local tensor name] = (source tensor name, dim, start, stop)`` (dim None:
    replicated)."""

    style: str  # "colwise" / "rowwise"
    rank: int
    world: int
    slices: dict


def _mesh_info(mesh: DeviceMesh) -> tuple[int, int, str]:
    if mesh.ndim != 1:
        raise ShardError(f"tensor parallel needs a 1-D device mesh, got {mesh.ndim}-D; pass mesh['tp']")
    return mesh.get_local_rank(), mesh.size(), mesh.get_group().group_name


def _narrow(t: Optional[torch.Tensor], dim: int, start: int, stop: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.narrow(dim, start, stop - start).clone()  # own storage: the full tensor can be freed


def _set(module: nn.Module, name: str, value: Optional[torch.Tensor]) -> None:
    if name in module._parameters:
        module._parameters[name] = None if value is None else nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _check_fresh(module: nn.Module) -> None:
    if hasattr(module, TP_ATTR):
        raise ShardError(f"{type(module).__name__} is already sharded ({getattr(module, TP_ATTR)}); shard it once")


class WushColwiseParallel(ParallelStyle):
    """Column-parallel (N split) for WushLinear and nn.Linear, with plain local tensors.

    Args:
        gather_output: all-gather the output shards along the last dim (default: keep the local shard, which the
            row-parallel layer after it consumes).
    """

    def __init__(self, gather_output: bool = False) -> None:
        super().__init__()
        self.gather_output = gather_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rank, world, group = _mesh_info(device_mesh)
        _check_fresh(module)
        if isinstance(module, WushLinear):
            n = module.out_features
            names = ["weight_codes", "weight_scales", "bias"]
        elif isinstance(module, nn.Linear):
            n = module.out_features
            names = ["weight", "bias"]
        else:
            raise ShardError(f"WushColwiseParallel shards WushLinear or nn.Linear, got {type(module).__name__}")
        if n % world:
            raise ShardError(
                f"column-parallel: out_features N={n} is not a multiple of tp={world}; use a tp that divides N"
            )
        nl = n // world
        lo, hi = rank * nl, (rank + 1) * nl
        slices = {}
        for name in names:
            t = getattr(module, name, None)
            if t is not None:
                _set(module, name, _narrow(t, 0, lo, hi))
                slices[name] = (name, 0, lo, hi)
        module.out_features = nl
        setattr(module, TP_ATTR, ShardInfo("colwise", rank, world, slices))
        if self.gather_output:
            def gather(mod, args, out):
                from torch.distributed import _functional_collectives as funcol

                return funcol.all_gather_tensor(out.contiguous(), gather_dim=out.dim() - 1, group=group)

            module.register_forward_hook(gather)
        return module


class WushRowwiseParallel(ParallelStyle):
    """Row-parallel (K split, whole blocks of G) for WushLinear and nn.Linear, with plain local tensors.

    Args:
        input_is_sharded: the input already holds this rank's K slice (the output of a column-parallel layer, the
            default); False: the input is the whole x and the layer takes its slice itself.
    """

    def __init__(self, input_is_sharded: bool = True) -> None:
        super().__init__()
        self.input_is_sharded = input_is_sharded

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rank, world, group = _mesh_info(device_mesh)
        _check_fresh(module)
        k = module.in_features
        if isinstance(module, WushLinear):
            g = module.group_size
            kl = row_shard_width(k, world, module.fmt.value)
            cuts = {"weight_codes": (1, kl // 2), "weight_scales": (1, kl // g), "transform": (0, kl // g)}
        elif isinstance(module, nn.Linear):
            if k % world:
                raise ShardError(f"row-parallel: in_features K={k} is not a multiple of tp={world}")
            kl = k // world
            cuts = {"weight": (1, kl)}
        else:
            raise ShardError(f"WushRowwiseParallel shards WushLinear or nn.Linear, got {type(module).__name__}")
        slices = {}
        for name, (dim, width) in cuts.items():
            lo, hi = rank * width, (rank + 1) * width
            _set(module, name, _narrow(getattr(module, name), dim, lo, hi))
            slices[name] = (name, dim, lo, hi)
        bias = getattr(module, "bias", None)
        if bias is not None:
            # The forward must not add it per rank: move it where only the post-reduce hook reads it.
            _set(module, "bias", None)
            module.register_buffer(ROW_BIAS, bias.detach().clone())
            slices[ROW_BIAS] = ("bias", None, None, None)
        module.in_features = kl
        setattr(module, TP_ATTR, ShardInfo("rowwise", rank, world, slices))

        if not self.input_is_sharded:
            lo = rank * kl

            def take_slice(mod, args):
                x = args[0]
                return (x.narrow(-1, lo, kl), *args[1:])

            module.register_forward_pre_hook(take_slice)

        def reduce(mod, args, out):
            from torch.distributed import _functional_collectives as funcol

            out = funcol.all_reduce(out, "sum", group)
            b = mod._buffers.get(ROW_BIAS)
            return out if b is None else out + b

        module.register_forward_hook(reduce)
        return module


def row_shard_width(k: int, world: int, fmt: str, what: str = "row-parallel") -> int:
    """Columns per rank of a row-parallel (K split) quantized layer: ``K / tp``, which must hold whole transform
    blocks of G (a ShardError naming K, tp and G otherwise). Shared by :class:`WushRowwiseParallel` and the vLLM
    linear method (:mod:`wush_compile.vllm`)."""
    from .config import Format

    g = Format.parse(fmt).group_size
    if k % (world * g):
        raise ShardError(
            f"{what}: in_features K={k} over tp={world} gives K/tp={k / world:g} columns per rank, not "
            f"a multiple of the {Format.parse(fmt).value} block size G={g}; a shard must hold whole transform "
            f"blocks (K must be a multiple of tp*G={world * g}) - use a smaller tp or keep this layer "
            "replicated"
        )
    return k // world


_STYLES = {"colwise": WushColwiseParallel, "rowwise": WushRowwiseParallel}


def tp_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The model's transformers ``base_model_tp_plan`` (``"colwise"`` / ``"rowwise"`` entries) as wush styles, keyed
    by module path from ``model`` (e.g. ``model.layers.*.self_attn.q_proj``)."""
    config = getattr(model, "config", None)
    base = getattr(config, "base_model_tp_plan", None) if config is not None else None
    if not base:
        raise ShardError(
            f"{type(model).__name__} has no transformers base_model_tp_plan; pass a plan "
            "({module path: WushColwiseParallel() / WushRowwiseParallel()}) to parallelize_module yourself"
        )
    prefix = getattr(model, "base_model_prefix", "model")
    if not hasattr(model, prefix):
        prefix = ""
    plan = {}
    for path, style in base.items():
        if style not in _STYLES:
            raise ShardError(
                f"tp plan entry {path!r}: style {style!r} is not supported (only {sorted(_STYLES)}); write the plan "
                "by hand"
            )
        plan[f"{prefix}.{path}" if prefix else path] = _STYLES[style]()
    return plan


def _check_heads(model: nn.Module, world: int) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    for what, v in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if v is not None and v % world:
            raise ShardError(f"{what}={v} is not a multiple of tp={world}; each rank must hold whole heads")


def parallelize(model: nn.Module, mesh: DeviceMesh, plan: Optional[dict[str, ParallelStyle]] = None) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``mesh`` (``plan`` default: :func:`tp_plan`); returns it."""
    _, world, _ = _mesh_info(mesh)
    _check_heads(model, world)
    plan = tp_plan(model) if plan is None else plan
    parallelize_module(model, mesh, plan)
    n = sum(hasattr(m, TP_ATTR) for m in model.modules())
    if n == 0:
        raise ShardError("the tp plan matched no module; check its module paths")
    logger.info("tensor parallel: %d modules sharded over tp=%d", n, world)
    return model


# --------------------------------------------------------------------------------------------------------------
# Checkpoint straight into shards
# --------------------------------------------------------------------------------------------------------------


def _files(path: str) -> list[str]:
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors file; save the model with save_pretrained first")
    return files


def _read(f, name: str, dim: Optional[int], start: Optional[int], stop: Optional[int]) -> torch.Tensor:
    if dim is None:
        return f.get_tensor(name)
    sl = f.get_slice(name)
    index = tuple(slice(None) for _ in range(dim)) + (slice(start, stop),)
    return sl[index]


def load_sharded(path: str, mesh: DeviceMesh, plan: Optional[dict[str, ParallelStyle]] = None,
                 device: Any = "cpu") -> nn.Module:
    """Load a saved wush checkpoint (``save_pretrained`` directory) straight into this rank's shards.

    The model is built on the meta device, its Linears swapped for WushLinears (from ``config.json``), the headers
    checked (:func:`wush_compile.hf.check_checkpoint`), the model sharded (``plan``, default :func:`tp_plan`), and
    each tensor read as this rank's slice only (replicated tensors whole). The CRC-32s recorded for whole tensors are
    not checked (a rank holds only a slice).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import hf

    files = _files(path)
    config = AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    qconfig = qc if isinstance(qc, hf.WushQuantizationConfig) else hf.WushQuantizationConfig(**dict(qc))
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None))
    model.eval().requires_grad_(False)
    hf.replace_linears(model, qconfig)
    index = hf.check_checkpoint(files, qconfig, model)
    parallelize(model, mesh, plan)

    handles = {p: safe_open(p, framework="pt", device=str(device)) for p in files}
    missing = []
    for mod_name, mod in model.named_modules():
        info: Optional[ShardInfo] = getattr(mod, TP_ATTR, None)
        prefix = f"{mod_name}." if mod_name else ""
        tensors = dict(mod._parameters) | dict(mod._buffers)
        for local, t in tensors.items():
            if t is None or (local in mod._buffers and local in mod._non_persistent_buffers_set):
                continue
            src, dim, lo, hi = info.slices.get(local, (local, None, None, None)) if info else (local, None, None, None)
            key = prefix + src
            if key not in index:
                missing.append(key)
                continue
            value = _read(handles[index[key][0]], key, dim, lo, hi)
            if tuple(value.shape) != tuple(t.shape):
                raise hf.CheckpointError(
                    f"{index[key][0]}: slice of '{key}' has shape {list(value.shape)}, the shard needs {list(t.shape)}"
                )
            _set(mod, local, value.to(device))
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if set(missing) - tied:
        raise hf.CheckpointError(f"{path}: tensors missing from the checkpoint: {sorted(set(missing) - tied)[:8]}")
    model.tie_weights()
    _rebuild_nonpersistent(model, device)
    model.config.quantization_config = qconfig
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise hf.CheckpointError(f"{path}: not loaded into the shards: {left[:8]}")
    logger.info("tensor parallel: loaded %s into rank %d of %d", path, mesh.get_local_rank(), mesh.size())
    return model


def _rebuild_nonpersistent(model: nn.Module, device: Any) -> None:
    """Recompute the non-persistent buffers a meta build left empty (rotary ``inv_freq``): rebuild their module."""
    from . import hf

    for name, mod in list(model.named_modules()):
        meta = [b for b in mod._non_persistent_buffers_set if getattr(mod, b, None) is not None
                and getattr(mod, b).device.type == "meta"]
        if not meta:
            continue
        cfg = getattr(mod, "config", None)
        if cfg is None:
            raise hf.CheckpointError(f"module {name!r}: cannot recompute its buffers {meta} after a meta build")
        with torch.device(device):
            new = type(mod)(config=cfg)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
