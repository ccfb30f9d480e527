"""The vLLM plugin's logic that needs no vLLM: which checkpoint modules a vLLM layer holds, the checks on its shapes
and on the checkpoint files, and the forward of one (possibly fused) layer through ``torch.ops.wush``.

Kept apart from :mod:`wush_compile.vllm.plugin` (the vLLM classes) so that it is tested without vLLM installed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from typing import Any, Optional, Sequence

import torch

from .. import formats, hf
from ..config import Format
from ..ops import library as _ops  # noqa: F401  (registers torch.ops.wush.*)
from ..parallel import ShardError, row_shard_width

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PACKED_MODULES",
    "LayerSpec",
    "ShardError",
    "layer_spec",
    "dropped_tensor_pattern",
    "verify_checkpoint_dir",
    "local_k",
    "member_index",
    "Forward",
    "plan_forward",
]

#: vLLM's fused Llama layers and the checkpoint modules they hold (LlamaForCausalLM.packed_modules_mapping).
DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
#: vLLM's qkv shard ids.
_QKV = {"q": 0, "k": 1, "v": 2}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The checkpoint modules one vLLM linear layer holds (one, or the members of a fused q/k/v or gate/up)."""

    prefix: str
    members: tuple[str, ...]
    fmt: Format
    dtype: torch.dtype
    in_features: Optional[int]  # None: not in config.json (format 3 takes sizes from the model's layers)
    out_features: tuple[Optional[int], ...]
    bias: bool
    share_groups: tuple[Optional[str], ...]

    @property
    def group_size(self) -> int:
        return self.fmt.group_size


def _member_names(prefix: str, packed: dict[str, list[str]]) -> list[str]:
    parent, _, leaf = prefix.rpartition(".")
    names = packed.get(leaf)
    if not names:
        return [prefix]
    return [f"{parent}.{n}" if parent else n for n in names]


def layer_spec(qc: "hf.WushQuantizationConfig", prefix: str, packed: dict[str, list[str]] | None = None
               ) -> Optional[LayerSpec]:
    """The :class:`LayerSpec` of vLLM layer ``prefix`` (e.g. ``model.layers.0.self_attn.qkv_proj``), or None when
    the checkpoint stores none of its modules quantized (the layer stays in high precision)."""
    packed = packed or DEFAULT_PACKED_MODULES
    names = _member_names(prefix, packed)
    entries = [qc.modules.get(n) for n in names]
    if all(e is None for e in entries):
        return None
    where = f"config.json quantization_config, vLLM layer '{prefix}'"
    if any(e is None for e in entries):
        have = [n for n, e in zip(names, entries) if e is not None]
        lack = [n for n, e in zip(names, entries) if e is None]
        raise hf.CheckpointError(
            f"{where}: vLLM fuses {names} into one layer, but only {have} are quantized ({lack} are not); serving "
            "a fused layer that is partly high precision is not supported - calibrate all of them or none"
        )
    for key in ("fmt", "dtype", "in_features", "bias"):
        values = {e[key] for e in entries}
        if len(values) > 1:
            raise hf.CheckpointError(
                f"{where}: the fused members {names} differ in {key} ({sorted(map(str, values))}); vLLM runs them "
                "as one layer, which needs one value - calibrate them with one setting"
            )
    e0 = entries[0]
    return LayerSpec(
        prefix=prefix,
        members=tuple(names),
        fmt=Format.parse(e0["fmt"]),
        dtype=hf._FLOAT_DTYPES[e0["dtype"]],
        in_features=_size(e0.get("in_features")),
        out_features=tuple(_size(e.get("out_features")) for e in entries),
        bias=bool(e0["bias"]),
        share_groups=tuple(e["share_group"] for e in entries),
    )


def _size(v) -> Optional[int]:
    return None if v is None else int(v)


def check_layer_sizes(spec: LayerSpec, input_size: int, output_sizes: Sequence[int]) -> None:
    """The vLLM layer's full sizes must be those config.json records for its modules (where it records them;
    format 3 leaves them to the model, and the tensors' shapes are checked as they load)."""
    outs = tuple(int(s) for s in output_sizes)
    bad_in = spec.in_features is not None and input_size != spec.in_features
    bad_out = len(outs) != len(spec.out_features) or any(
        want is not None and got != want for got, want in zip(outs, spec.out_features))
    if bad_in or bad_out:
        raise hf.CheckpointError(
            f"config.json quantization_config: vLLM layer '{spec.prefix}' is {input_size} -> {list(output_sizes)}, "
            f"but the checkpoint's {list(spec.members)} are {spec.in_features} -> {list(spec.out_features)}; the "
            "config does not match the model"
        )


def local_k(spec: LayerSpec, input_size: int, input_size_per_partition: int) -> int:
    """This rank's K: the whole K (column-parallel or tp 1), or K/tp in whole blocks of G (row-parallel)."""
    if input_size_per_partition == input_size:
        return input_size
    if input_size_per_partition <= 0 or input_size % input_size_per_partition:
        raise ShardError(
            f"vLLM layer '{spec.prefix}': K per rank {input_size_per_partition} does not divide K={input_size}"
        )
    world = input_size // input_size_per_partition
    return row_shard_width(input_size, world, spec.fmt.value, what=f"vLLM row-parallel layer '{spec.prefix}'")


def member_index(shard_id: Any, n_members: int, prefix: str) -> int:
    """vLLM's shard id of a fused layer's member (``"q"/"k"/"v"``, 0/1, or None for a single layer) as an index."""
    if shard_id is None:
        if n_members != 1:
            raise hf.CheckpointError(f"vLLM layer '{prefix}': a fused layer's tensor came without a shard id")
        return 0
    i = _QKV.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_members:
        raise hf.CheckpointError(f"vLLM layer '{prefix}': shard id {shard_id!r} is not one of its {n_members} members")
    return i


def dropped_tensor_pattern(qc: "hf.WushQuantizationConfig") -> re.Pattern:
    """Checkpoint tensors vLLM does not load: the integrity tensor, the guard ``<module>.weight`` of every quantized
    module (a zero-size placeholder) and its MXFP4 ``weight_row_exponent`` (checked against the scales on the
    files, :func:`verify_checkpoint_dir`)."""
    names = "|".join(re.escape(n) for n in qc.modules) or "(?!)"
    return re.compile(rf"^{re.escape(hf.INTEGRITY_TENSOR)}$|(^|\.)({names})\.(weight|weight_row_exponent)$")


def checkpoint_files(model_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise hf.CheckpointError(
            f"{model_dir}: no .safetensors file; a wush checkpoint is written by save_pretrained"
        )
    return files


def verify_checkpoint_dir(model_dir: str, qc: "hf.WushQuantizationConfig") -> dict:
    """The checks ``from_pretrained`` runs, on the files vLLM will read: every quantized module's tensors (names,
    dtypes, shapes, no full-precision weight under a quantized name), the format-2 integrity tensor (a CRC-32 of
    every tensor and of the quantization config), the per-module CRC-32s config.json records, and the MXFP4 row
    exponents against the scales. Raises :class:`~wush_compile.hf.CheckpointError` naming the file and tensor."""
    from safetensors import safe_open

    files = checkpoint_files(model_dir)
    index = hf.check_checkpoint(files, qc)
    if qc.format_version >= 2:
        hf.verify_file_integrity(files, qc)
    handles: dict[str, Any] = {}

    def read(tensor: str) -> torch.Tensor:
        path = index[tensor][0]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(tensor)

    for name, entry in qc.modules.items():
        for buf, crc in (entry.get("crc32") or {}).items():
            tensor = f"{name}.{buf}"
            if tensor in index and hf._crc32(read(tensor)) != crc:
                raise hf.CheckpointError(
                    f"{index[tensor][0]}: tensor '{tensor}' does not match the CRC-32 recorded in config.json; the "
                    "file is corrupt (or config.json belongs to another checkpoint) - copy or save it again"
                )
        row = f"{name}.weight_row_exponent"
        if Format.parse(entry["fmt"]) is Format.MXFP4 and row in index:
            want = formats.mx_row_reference_exponent(read(f"{name}.weight_scales"))
            if not torch.equal(read(row), want):
                raise hf.CheckpointError(
                    f"{index[row][0]}: tensor '{row}' does not match the row maxima of '{name}.weight_scales'; the "
                    "file is corrupt or was edited - save it again"
                )
    logger.info("wush: checkpoint %s verified (%d quantized modules, %d files)", model_dir, len(qc.modules),
                len(files))
    return index


def load_config_dict(config: dict[str, Any]) -> "hf.WushQuantizationConfig":
    """config.json's ``quantization_config`` (a dict, as vLLM hands it) as a validated WushQuantizationConfig."""
    if not isinstance(config, dict):
        config = config.to_dict()
    return hf.WushQuantizationConfig(**json.loads(json.dumps(config)))


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Forward:
    """How a loaded layer runs: ``single`` (one ``wush.fused_linear`` over all rows: one member, or fused members with
    one transform, activation scale and weight global scale), ``group`` (one transform and activation scale,
    per-member weight global scales: ``wush.fused_linear_group``, x quantized once) or ``members`` (each member
    its own transform: one ``wush.fused_linear`` each)."""

    mode: str
    sizes: tuple[int, ...]


def plan_forward(transform: torch.Tensor, act_global_scale: torch.Tensor, weight_global_scale: torch.Tensor,
                 sizes: Sequence[int]) -> Forward:
    """Pick the :class:`Forward` mode from the loaded values (``transform`` (members, K/G, G, G), the scales
    (members,)). Shared transforms are detected by value, so a checkpoint's share groups need no trust."""
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) == 1:
        return Forward("single", sizes)
    shared = all(torch.equal(transform[0], t) for t in transform[1:]) and bool(
        (act_global_scale == act_global_scale[0]).all())
    if not shared:
        return Forward("members", sizes)
    if bool((weight_global_scale == weight_global_scale[0]).all()):
        return Forward("single", sizes)
    return Forward("group", sizes)


def forward(plan: Forward, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, transform: torch.Tensor,
            wgs: torch.Tensor, ags: torch.Tensor, bias: Optional[torch.Tensor], fmt: str,
            kernel: str = "auto") -> torch.Tensor:
    """The layer's output (M, sum(sizes)) for x (M, K_local) through ``torch.ops.wush``: ``fused_linear`` /
    ``fused_linear_group``, the ops the ``wush`` compiler rewrites a WushLinear's ``wush.linear`` into, so the
    dispatcher picks the kernel per call from M (``kernel="auto"``; on the CPU: the reference path, the numbers of
    ``wush.linear``). ``codes`` / ``scales`` hold the members' rows one after another."""
    if plan.mode == "single":
        return torch.ops.wush.fused_linear(x, codes, scales, transform[0], wgs[0], ags[0], bias, fmt, kernel)
    offsets = [0]
    for s in plan.sizes:
        offsets.append(offsets[-1] + s)
    rows = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
    biases = [None if bias is None else bias[r] for r in rows]
    if plan.mode == "group":
        outs = torch.ops.wush.fused_linear_group(
            x, [codes[r] for r in rows], [scales[r] for r in rows], transform[0], [wgs[i] for i in range(len(rows))],
            ags[0], biases, fmt, kernel)
    else:
        outs = [torch.ops.wush.fused_linear(x, codes[r], scales[r], transform[i], wgs[i], ags[i], biases[i], fmt,
                                            kernel) for i, r in enumerate(rows)]
    return torch.cat(outs, dim=-1)
