"""Checkpoints: the ``wush`` quantization method for Hugging Face transformers.

After ``import wush_compile``:

- ``model.save_pretrained(dir)`` on a model marked as a wush model (``calibrate()`` does it; :func:`attach` or
  :func:`save_pretrained` for a model assembled by hand; ``PreTrainedModel.save_pretrained`` itself is not patched:
  the save path runs through the quantizer's ``get_state_dict_and_metadata`` hook) writes
  ``config.json`` with a ``quantization_config`` (``quant_method: "wush"``, a format version, the model-level
  settings and one entry per quantized Linear) and the buffers (packed codes, scales, transforms, global scales,
  biases) in safetensors. No full-precision weight of a quantized layer is written.
- ``AutoModelForCausalLM.from_pretrained(dir)`` builds the model on the meta device, swaps the listed Linears for
  meta-device WushLinears before any weight is read, checks every quantized layer's tensors in the safetensors
  headers (name, shape, dtype; errors name the file and the tensor), then lets transformers assign the buffers.
  The round trip is bit-identical.
- Format 2 adds, per quantized Linear, a zero-size uint8 tensor ``<module>.weight``: transformers without this
  quantizer (a process that never imported wush_compile, or a config.json whose ``quantization_config`` was
  deleted) then sees a shape mismatch for the Linear's weight and raises instead of random-initializing it
  (``ignore_mismatched_sizes=True`` is the caller's explicit opt-in to random weights). The safetensors metadata of
  every file records a CRC-32 of each of its tensors and of the quantization config, verified before loading.
  Format 1 checkpoints still load (their MXFP4 row exponents are derived at load).
- Format 3 writes each module entry compactly: only the settings that differ from the model-wide ones (``format``,
  ``transform``, ``dtype``; no bias, no share group), without the sizes (the model's Linear gives them; the tensors
  are checked against them). In memory every entry is complete; the config CRC-32 covers the compact form.

Registration with transformers is idempotent (importing twice, or reloading this module, is fine).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from typing import Any, Iterable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import auto as _hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import formats
from .config import Format, TransformKind, WushConfig
from .modules import WushLinear

logger = logging.getLogger(__name__)

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "CheckpointError",
    "WushQuantizationConfig",
    "WushHfQuantizer",
    "attach",
    "wush_config",
    "quantized_modules",
    "register",
    "save_pretrained",
    "verify_file_integrity",
    "INTEGRITY_TENSOR",
]

QUANT_METHOD = "wush"
#: Version of the on-disk layout (tensor names, shapes, dtypes, config keys). Bump on any change.
#: 1: buffers + per-module CRC-32 of the quantized buffers in config.json.
#: 2: + ``weight_row_exponent`` (MXFP4), a zero-size uint8 guard tensor ``<module>.weight`` per quantized Linear
#:    (a loader without the wush quantizer sees a shape mismatch and refuses, instead of random-initializing the
#:    Linear), and a CRC-32 of every tensor of the file and of the quantization config in the safetensors metadata.
#: 3: compact config: a per-module entry holds only what differs from the defaults (``fmt`` = top-level ``format``,
#:    ``transform_kind`` = ``transform``, ``dtype`` = top-level ``dtype``, ``bias`` false, ``share_group`` null);
#:    ``in_features`` / ``out_features`` are the model's Linear's (checked against the tensors) and not written.
FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
#: Per-module values a format-3 entry leaves out (the format / transform / dtype defaults are the top-level ones).
_ENTRY_DEFAULTS = {"bias": False, "share_group": None}
#: Per-module keys format 3 never writes: the model's Linear gives them.
_SIZE_KEYS = ("in_features", "out_features")
#: Integrity tensor (format 2): uint8 bytes of the JSON ``{"config": CRC-32 of the quantization config, "tensors":
#: {tensor: CRC-32}}`` over every other tensor of the checkpoint (all shards). A tensor, not safetensors metadata:
#: the metadata map is written in hash order, which would make two saves of one model differ in bytes.
INTEGRITY_TENSOR = "wush_integrity"
#: Name of the guard tensor of a quantized Linear (format 2): what a plain Linear would load as its weight.
_GUARD = "weight"

#: Per-module entry keys of ``quantization_config["modules"]``.
_MODULE_KEYS = ("fmt", "transform_kind", "share_group", "bias", "in_features", "out_features", "dtype")
#: Optional per-module key: ``{buffer name: CRC-32 of its bytes}``, checked after loading.
_CRC_KEY = "crc32"
#: Optional per-module key (NVFP4): ``true`` when the layer quantizes activations with a per-call dynamic global
#: scale (``WushLinear.dynamic_act_scale``); absent means static.
_DYNAMIC_KEY = "dynamic_act_scale"
#: Storage dtypes a transform / bias may have.
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: safetensors dtype tags.
_ST_DTYPE = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16"}
_MIXED = "mixed"


class CheckpointError(ValueError):
    """A wush checkpoint that cannot be loaded: corrupt file, missing / misshapen tensor, config mismatch."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------------------
# The quantization config (what config.json carries)
# --------------------------------------------------------------------------------------------------------------


class WushQuantizationConfig(QuantizationConfigMixin):
    """``config.json["quantization_config"]`` of a wush model.

    Args:
        format_version: on-disk layout version (:data:`FORMAT_VERSION`).
        format: the models' FP4 format ("mxfp4" / "nvfp4", or "mixed" when the layers differ).
        method: "rtn" / "gptq" when known (from the calibration config), else None.
        transform: the transform kind of the layers ("mixed" when they differ).
        modules: ``{module name: {fmt, transform_kind, share_group, bias, in_features, out_features, dtype,
            crc32}}`` for every quantized Linear (``dtype`` is the storage dtype of its transform and bias;
            ``crc32``, optional, the CRC-32 of each buffer's bytes, checked after loading).
        modules_to_not_convert: names of the Linears left in high precision.
        calibration: ``WushConfig.to_dict()`` of the calibration run, when known.
    """

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        format: str | None = None,
        method: str | None = None,
        transform: str | None = None,
        modules: dict[str, dict[str, Any]] | None = None,
        modules_to_not_convert: list[str] | None = None,
        calibration: dict[str, Any] | None = None,
        quant_method: str = QUANT_METHOD,
        dtype: str | None = None,
        **unknown: Any,
    ) -> None:
        where = "config.json quantization_config"
        if dtype is not None and format_version in (1, 2):
            unknown["dtype"] = dtype
        if unknown:
            raise CheckpointError(
                f"{where}: unknown keys {sorted(unknown)} (format_version {format_version!r}); this wush_compile "
                f"reads format version(s) {list(SUPPORTED_FORMAT_VERSIONS)} - upgrade wush_compile or re-save"
            )
        if quant_method != QUANT_METHOD:
            raise CheckpointError(f"{where}: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.format = format
        self.method = method
        self.transform = transform
        self.modules = {} if modules is None else (dict(modules) if isinstance(modules, dict) else modules)
        self.modules_to_not_convert = [] if modules_to_not_convert is None else modules_to_not_convert
        self.calibration = calibration
        self.dtype = dtype
        self.post_init()

    def post_init(self) -> None:
        where = "config.json quantization_config"
        v = self.format_version
        if isinstance(v, bool) or not isinstance(v, int) or v not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointError(
                f"{where}: format_version {v!r} is not supported; this wush_compile reads version(s) "
                f"{list(SUPPORTED_FORMAT_VERSIONS)} - upgrade wush_compile to load this checkpoint"
            )
        if not isinstance(self.modules, dict):
            raise CheckpointError(f"{where}: 'modules' must be a mapping of module name -> settings")
        if v >= 3 and self.dtype is not None and self.dtype != _MIXED and self.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: dtype {self.dtype!r} is not one of {sorted(_FLOAT_DTYPES)} or 'mixed'")
        for name, entry in self.modules.items():
            if v >= 3 and isinstance(entry, dict):
                entry = {**self._entry_defaults(), **{k: None for k in _SIZE_KEYS}, **entry}
            self.modules[name] = _check_module_entry(name, entry, sized=v < 3)
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(s, str) for s in self.modules_to_not_convert
        ):
            raise CheckpointError(f"{where}: 'modules_to_not_convert' must be a list of module names")
        if self.format is not None and self.format != _MIXED:
            Format.parse(self.format)
        if self.transform is not None and self.transform != _MIXED:
            TransformKind.parse(self.transform)
        calib = None
        if self.calibration is not None:
            try:
                calib = WushConfig.from_dict(self.calibration)
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"{where}: 'calibration' is not a valid WushConfig: {err}") from err
        _check_levels_agree(self, calib, where)

    def _entry_defaults(self) -> dict[str, Any]:
        """What a format-3 module entry leaves out (the top-level format, transform and dtype, when not mixed)."""
        out = dict(_ENTRY_DEFAULTS)
        for key, top in (("fmt", self.format), ("transform_kind", self.transform), ("dtype", self.dtype)):
            if top is not None and top != _MIXED:
                out[key] = top
        return out

    def to_dict(self) -> dict[str, Any]:
        """What config.json stores (and the config CRC-32 covers): format 3 writes each module entry compactly (only
        what differs from :meth:`_entry_defaults`, no sizes); formats 1 and 2 as they were read."""
        import copy

        out = {
            "quant_method": self.quant_method, "format_version": self.format_version, "format": self.format,
            "method": self.method, "transform": self.transform, "modules": copy.deepcopy(self.modules),
            "modules_to_not_convert": list(self.modules_to_not_convert), "calibration": copy.deepcopy(self.calibration),
        }
        if self.format_version >= 3:
            out["dtype"] = self.dtype
            defaults = self._entry_defaults()
            out["modules"] = {
                name: {k: v for k, v in entry.items() if k not in _SIZE_KEYS and (k not in defaults or defaults[k] != v)}
                for name, entry in self.modules.items()
            }
        return out

    def wush_config(self) -> WushConfig | None:
        """The calibration settings as a :class:`WushConfig` (None when the checkpoint does not record them)."""
        return None if self.calibration is None else WushConfig.from_dict(self.calibration)

    @classmethod
    def from_model(cls, model: nn.Module, config: WushConfig | None = None) -> "WushQuantizationConfig":
        """Describe ``model``'s WushLinear layers (and the Linears left in high precision)."""
        modules: dict[str, dict[str, Any]] = {}
        not_converted: list[str] = []
        for name, mod in model.named_modules():
            if isinstance(mod, WushLinear):
                modules[name] = {
                    "fmt": mod.fmt.value,
                    "transform_kind": mod.transform_kind.value,
                    "share_group": mod.share_group,
                    "bias": mod.bias is not None,
                    "in_features": int(mod.in_features),
                    "out_features": int(mod.out_features),
                    "dtype": _dtype_name(mod.transform.dtype),
                }
                if mod.dynamic_act_scale:
                    modules[name][_DYNAMIC_KEY] = True
            elif isinstance(mod, nn.Linear):
                not_converted.append(name)
        fmts = {e["fmt"] for e in modules.values()}
        kinds = {e["transform_kind"] for e in modules.values()}
        dtypes = {e["dtype"] for e in modules.values()}
        if config is not None:
            fmts.add(config.format.value)
            kinds.add(config.transform.value)
        return cls(
            format=_common(fmts),
            method=None if config is None else config.method.value,
            transform=_common(kinds),
            modules=modules,
            modules_to_not_convert=not_converted,
            calibration=None if config is None else config.to_dict(),
            dtype=_common(dtypes),
        )


def _check_levels_agree(qc: "WushQuantizationConfig", calib: WushConfig | None, where: str) -> None:
    """The top-level settings, the calibration block and the per-module entries must describe the same model."""
    for top_key, calib_key, module_key in (("format", "format", "fmt"), ("transform", "transform", "transform_kind")):
        top = getattr(qc, top_key)
        if calib is not None and top is not None and top != _MIXED and top != getattr(calib, calib_key).value:
            raise CheckpointError(
                f"{where}: {top_key} is {top!r} but calibration.{calib_key} is {getattr(calib, calib_key).value!r}; "
                "the config was edited or belongs to another checkpoint - save it again"
            )
        values = {e[module_key] for e in qc.modules.values()}
        if top is not None and top != _MIXED and values and values != {top}:
            raise CheckpointError(
                f"{where}: {top_key} is {top!r} but modules have {module_key} {sorted(values)}; the config does "
                "not agree with itself - save it again"
            )
        if top is not None and top != _MIXED and not values and qc.modules:
            raise CheckpointError(f"{where}: {top_key} is {top!r} but no module records it")
    top_dtype = getattr(qc, "dtype", None)
    dtypes = {e["dtype"] for e in qc.modules.values()}
    if top_dtype is not None and top_dtype != _MIXED and dtypes and dtypes != {top_dtype}:
        raise CheckpointError(
            f"{where}: dtype is {top_dtype!r} but modules have dtype {sorted(dtypes)}; the config does not agree with "
            "itself - save it again"
        )
    if calib is not None and qc.modules:
        want = calib.act_scale.value == "dynamic"
        differ = sorted(n for n, e in qc.modules.items() if bool(e.get(_DYNAMIC_KEY, False)) != want)
        if differ:
            raise CheckpointError(
                f"{where}: calibration.act_scale is {calib.act_scale.value!r} but module {differ[0]!r} "
                f"{'lacks' if want else 'has'} {_DYNAMIC_KEY}; the config does not agree with itself - save it again"
            )
    if calib is not None and qc.method is not None and qc.method != calib.method.value:
        raise CheckpointError(
            f"{where}: method is {qc.method!r} but calibration.method is {calib.method.value!r}; the config was "
            "edited or belongs to another checkpoint - save it again"
        )


def _common(values: set[str]) -> str | None:
    if not values:
        return None
    return next(iter(values)) if len(values) == 1 else _MIXED


def _check_module_entry(name: str, entry: Any, sized: bool = True) -> dict[str, Any]:
    """A module entry with every key of :data:`_MODULE_KEYS`; ``sized`` False (format 3): ``in_features`` /
    ``out_features`` may be None (filled from the model by :func:`replace_linears`)."""
    where = f"config.json quantization_config.modules[{name!r}]"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected a mapping, got {entry!r}")
    missing = [k for k in _MODULE_KEYS if k not in entry]
    extra = sorted(set(entry) - set(_MODULE_KEYS) - {_CRC_KEY, _DYNAMIC_KEY})
    if missing or extra:
        raise CheckpointError(f"{where}: missing keys {missing}, unknown keys {extra}; expected {list(_MODULE_KEYS)}")
    sums = entry.get(_CRC_KEY)
    if sums is not None and not (
        isinstance(sums, dict)
        and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in sums.items())
    ):
        raise CheckpointError(f"{where}: {_CRC_KEY} must map buffer names to integers, got {sums!r}")
    try:
        fmt = Format.parse(entry["fmt"])
        TransformKind.parse(entry["transform_kind"])
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from err
    for key in _SIZE_KEYS:
        v = entry[key]
        if v is None and not sized:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {v!r}")
    if entry["in_features"] is not None and entry["in_features"] % fmt.group_size:
        raise CheckpointError(
            f"{where}: in_features={entry['in_features']} is not a multiple of the {fmt.value} group size "
            f"G={fmt.group_size}"
        )
    if entry["dtype"] not in _FLOAT_DTYPES:
        raise CheckpointError(f"{where}: dtype {entry['dtype']!r} is not one of {sorted(_FLOAT_DTYPES)}")
    if not isinstance(entry["bias"], bool):
        raise CheckpointError(f"{where}: bias must be true or false, got {entry['bias']!r}")
    if entry["share_group"] is not None and not isinstance(entry["share_group"], str):
        raise CheckpointError(f"{where}: share_group must be a string or null, got {entry['share_group']!r}")
    if _DYNAMIC_KEY in entry and (entry[_DYNAMIC_KEY] is not True or fmt is not Format.NVFP4):
        raise CheckpointError(
            f"{where}: {_DYNAMIC_KEY} may only be true, on an nvfp4 layer; got {entry[_DYNAMIC_KEY]!r} ({fmt.value})"
        )
    return dict(entry)


def expected_tensors(
    name: str, entry: dict[str, Any], version: int = FORMAT_VERSION
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (safetensors dtype tag, shape)}`` a quantized module must have in the checkpoint of
    format ``version`` (format 1 has no row exponent and no guard)."""
    fmt = Format.parse(entry["fmt"])
    g = fmt.group_size
    n, k = entry["out_features"], entry["in_features"]
    dt = _ST_DTYPE[_FLOAT_DTYPES[entry["dtype"]]]
    out = {
        f"{name}.weight_codes": ("U8", (n, k // 2)),
        f"{name}.weight_scales": ("U8", (n, k // g)),
        f"{name}.transform": (dt, (k // g, g, g)),
        f"{name}.weight_global_scale": ("F32", ()),
        f"{name}.act_global_scale": ("F32", ()),
    }
    if entry["bias"]:
        out[f"{name}.bias"] = (dt, (n,))
    if version >= 2:
        out[f"{name}.{_GUARD}"] = ("U8", (0,))
        if fmt is Format.MXFP4:
            out[f"{name}.weight_row_exponent"] = ("I16", (n,))
    return out


# --------------------------------------------------------------------------------------------------------------
# Checkpoint checks
# --------------------------------------------------------------------------------------------------------------


def _crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def _read_headers(files: Iterable[str]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """``{tensor: (file, dtype tag, shape)}`` from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    index: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(f"{path}: wush checkpoints are stored as safetensors; re-save with save_pretrained")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    index[key] = (str(path), sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as err:  # SafetensorError, OSError, ...: the file itself is unusable
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the checkpoint is corrupt "
                "or incomplete - copy or save it again"
            ) from err
    return index


def check_checkpoint(
    files: Iterable[str], qconfig: WushQuantizationConfig, model: nn.Module | None = None
) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Check the safetensors headers of ``files``: every quantized module's tensors (presence, dtype, shape) and,
    given the meta-device ``model``, that no other tensor it needs is missing. Returns the header index
    ``{tensor: (file, dtype tag, shape)}``."""
    files = [str(f) for f in files]
    index = _read_headers(files)
    where = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} safetensors files)"
    for name, entry in qconfig.modules.items():
        if f"{name}.weight" in index and index[f"{name}.weight"][1:] != ("U8", (0,)):
            path = index[f"{name}.weight"][0]
            raise CheckpointError(
                f"{path}: tensor '{name}.weight' is a full-precision weight, but config.json lists '{name}' as a "
                "quantized WushLinear; the config does not match the tensors"
            )
        if entry["in_features"] is None:  # format 3, a module this model does not have (e.g. a head): not loaded
            continue
        for tensor, (dt, shape) in expected_tensors(name, entry, qconfig.format_version).items():
            if tensor not in index:
                raise CheckpointError(
                    f"{where}: tensor '{tensor}' is missing; config.json lists '{name}' as a quantized "
                    f"{entry['fmt']} layer, which needs it ({dt} {list(shape)})"
                )
            path, got_dt, got_shape = index[tensor]
            if got_dt != dt:
                raise CheckpointError(
                    f"{path}: tensor '{tensor}' has dtype {got_dt}, expected {dt} for a {entry['fmt']} layer "
                    f"stored in {entry['dtype']}"
                )
            if got_shape != shape:
                raise CheckpointError(
                    f"{path}: tensor '{tensor}' has shape {list(got_shape)}, expected {list(shape)} for a "
                    f"{entry['fmt']} layer (G={Format.parse(entry['fmt']).group_size}) with "
                    f"in_features={entry['in_features']}, out_features={entry['out_features']}; the config does not "
                    "match the tensors"
                )
        if not entry["bias"] and f"{name}.bias" in index:
            raise CheckpointError(
                f"{index[f'{name}.bias'][0]}: tensor '{name}.bias' is present but config.json says '{name}' has no "
                "bias; the config does not match the tensors"
            )
    if model is not None:
        derived = set()
        if qconfig.format_version < 2:  # format 1 has no row exponents: derived after loading
            derived = {f"{n}.weight_row_exponent" for n in qconfig.modules}
        _check_no_missing_tensors(model, index, where, derived)
    return index


def _config_crc(qconfig: "WushQuantizationConfig") -> int:
    """CRC-32 of the quantization config as config.json stores it (canonical JSON)."""
    import json

    payload = {k: v for k, v in qconfig.to_dict().items()}
    return zlib.crc32(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())


def integrity_tensor(state: dict[str, torch.Tensor], qconfig: "WushQuantizationConfig") -> torch.Tensor:
    """The format-2 integrity tensor of ``state``: CRC-32 of every tensor and of the quantization config."""
    import json

    crcs = {k: _crc32(t) for k, t in sorted(state.items()) if isinstance(t, torch.Tensor) and k != INTEGRITY_TENSOR}
    payload = json.dumps({"config": _config_crc(qconfig), "tensors": crcs}, sort_keys=True, separators=(",", ":"))
    return torch.frombuffer(bytearray(payload.encode()), dtype=torch.uint8).clone()


def verify_file_integrity(files: Iterable[str], qconfig: "WushQuantizationConfig") -> None:
    """Check every tensor of every file against the CRC-32 the integrity tensor records, and the quantization config
    against its recorded CRC-32 (format 2). Errors name the file and the tensor."""
    import json

    from safetensors import safe_open

    files = [str(f) for f in files]
    where = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} safetensors files)"
    record = None
    for path in files:
        with safe_open(path, framework="pt") as f:
            if INTEGRITY_TENSOR in f.keys():
                try:
                    record = json.loads(bytes(f.get_tensor(INTEGRITY_TENSOR).numpy()).decode())
                    crcs, config_crc = dict(record["tensors"]), int(record["config"])
                except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
                    raise CheckpointError(
                        f"{path}: tensor '{INTEGRITY_TENSOR}' is unreadable ({type(err).__name__}: {err}); the file is "
                        "corrupt - copy or save it again"
                    ) from err
                break
    if record is None:
        raise CheckpointError(
            f"{where}: tensor '{INTEGRITY_TENSOR}' is missing, which format_version {qconfig.format_version} "
            "checkpoints carry; the checkpoint is incomplete or was not written by wush_compile - save it again"
        )
    if config_crc != _config_crc(qconfig):
        raise CheckpointError(
            f"{where}: config.json quantization_config does not match the CRC-32 recorded with the weights; "
            "config.json was edited or belongs to another checkpoint - copy or save it again"
        )
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key == INTEGRITY_TENSOR:
                    continue
                if key not in crcs:
                    raise CheckpointError(
                        f"{path}: tensor '{key}' is not covered by the checksums recorded when the checkpoint was "
                        "saved; the file was modified - save it again"
                    )
                if _crc32(f.get_tensor(key)) != crcs[key]:
                    raise CheckpointError(
                        f"{path}: tensor '{key}' does not match the CRC-32 recorded when the checkpoint was saved; "
                        "the file is corrupt - copy or save it again"
                    )


def _check_no_missing_tensors(model: nn.Module, index: dict, where: str, derived: set[str] = frozenset()) -> None:
    """Every state-dict entry of ``model`` (WushLinears already swapped in) is in the checkpoint, except tied
    weights and what the model class declares optional."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    present = set(index)
    if prefix:
        present |= {k[len(prefix) + 1 :] for k in index if k.startswith(prefix + ".")}
        present |= {f"{prefix}.{k}" for k in index}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    optional = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    for key in model.state_dict():
        if key in present or key in tied or key in derived or any(p.search(key) for p in optional):
            continue
        raise CheckpointError(f"{where}: tensor '{key}' is missing; the checkpoint is incomplete - save it again")


# --------------------------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------------------------


def quantized_modules(model: nn.Module) -> dict[str, WushLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, WushLinear)}


def _resolve(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """Find checkpoint module ``name`` in ``model`` (also across the base-model prefix, e.g. CausalLM <-> base)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    for cand in candidates:
        try:
            return cand, model.get_submodule(cand)
        except AttributeError:
            continue
    return None


def replace_linears(model: nn.Module, qconfig: WushQuantizationConfig) -> int:
    """Swap every Linear listed in ``qconfig.modules`` for a meta-device WushLinear (no weight is allocated)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    is_base_model = getattr(model, "base_model", None) is model
    for name, entry in qconfig.modules.items():
        found = _resolve(model, name)
        if found is None and is_base_model and prefix and not name.startswith(prefix + "."):
            logger.info("wush: %s is a head module outside %s; not loaded", name, type(model).__name__)
            continue
        if found is None:
            raise CheckpointError(
                f"config.json quantization_config lists '{name}' as a quantized Linear, but {type(model).__name__} "
                "has no such module; load the checkpoint with the model class it was saved from"
            )
        path, mod = found
        if isinstance(mod, WushLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise CheckpointError(
                f"config.json quantization_config lists '{name}' as a quantized Linear, but it is a "
                f"{type(mod).__name__}"
            )
        for key in _SIZE_KEYS:  # format 3 does not write them: the model's Linear gives them
            if entry[key] is None:
                entry[key] = int(getattr(mod, key))
        if entry["in_features"] % Format.parse(entry["fmt"]).group_size:
            raise CheckpointError(
                f"config.json quantization_config: '{name}' has in_features={entry['in_features']}, not a multiple of "
                f"the {entry['fmt']} group size G={Format.parse(entry['fmt']).group_size}; it cannot be a quantized Linear"
            )
        if (mod.in_features, mod.out_features) != (entry["in_features"], entry["out_features"]):
            raise CheckpointError(
                f"config.json quantization_config: '{name}' has in_features={entry['in_features']}, "
                f"out_features={entry['out_features']}, but the model's Linear is {mod.in_features} -> "
                f"{mod.out_features}; the config does not match the model"
            )
        new = WushLinear(
            entry["in_features"],
            entry["out_features"],
            bias=entry["bias"],
            fmt=entry["fmt"],
            dtype=_FLOAT_DTYPES[entry["dtype"]],
            device="meta",
            transform_kind=entry["transform_kind"],
            share_group=entry["share_group"],
            dynamic_act_scale=bool(entry.get(_DYNAMIC_KEY, False)),
        )
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return len(qconfig.modules)


def _wush_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buf_name}": buf
        for name, mod in quantized_modules(model).items()
        for buf_name, buf in mod.named_buffers(recurse=False)
    }


def verify_checksums(model: nn.Module, index: dict, qconfig: WushQuantizationConfig) -> None:
    """Compare every loaded WushLinear buffer with the CRC-32 that config.json recorded for it (when it did)."""
    for name, entry in qconfig.modules.items():
        sums = entry.get("crc32")
        found = _resolve(model, name)
        if not sums or found is None:
            continue
        mod = found[1]
        for buf_name, crc in sums.items():
            buf = getattr(mod, buf_name, None)
            if isinstance(buf, torch.Tensor) and _crc32(buf) != crc:
                tensor = f"{name}.{buf_name}"
                where = index.get(tensor, ("the checkpoint",))[0]
                raise CheckpointError(
                    f"{where}: tensor '{tensor}' does not match the CRC-32 recorded in config.json; the file is "
                    "corrupt (or config.json belongs to another checkpoint) - copy or save it again"
                )


def _check_loaded(model: nn.Module) -> None:
    for name, buf in _wush_tensors(model).items():
        if buf.device.type == "meta":
            raise CheckpointError(f"tensor '{name}' was not loaded from the checkpoint")
    for name, mod in quantized_modules(model).items():
        for buf_name in ("weight_global_scale", "act_global_scale"):
            v = getattr(mod, buf_name)
            if not bool(torch.isfinite(v)) or float(v) <= 0:
                raise CheckpointError(
                    f"tensor '{name}.{buf_name}' is {float(v)}; a global scale must be finite and > 0"
                )


def _untie_quantized_outputs(model: PreTrainedModel, names: Iterable[str]) -> None:
    """A quantized lm_head cannot share the embedding's weight: mark the config untied."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tied_modules = {k.removesuffix(".weight") for k in tied} | {v.removesuffix(".weight") for v in tied.values()}
    if set(names) & tied_modules:
        text_config = model.config.get_text_config()
        for cfg in (model.config, text_config) if text_config is not model.config else (model.config,):
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
                logger.info("quantized output embedding: tie_word_embeddings set to False")


# --------------------------------------------------------------------------------------------------------------
# The transformers quantizer
# --------------------------------------------------------------------------------------------------------------


class WushHfQuantizer(HfQuantizer):
    """Loads (and saves) wush checkpoints. Calibration needs data, so only pre-quantized checkpoints load."""

    requires_calibration = True
    quantization_config: WushQuantizationConfig

    def __init__(self, quantization_config, **kwargs) -> None:
        if not kwargs.get("pre_quantized", True):  # quantize on load: data-free configurations only
            self.requires_calibration = False
            self._on_load_config = on_load_config(quantization_config)
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model  # full-precision weights load first; quantized after loading
        qc = self.quantization_config
        n = replace_linears(model, qc)
        self._index = {}
        if checkpoint_files:
            self._index = check_checkpoint(checkpoint_files, qc, model)
            if qc.format_version >= 2:
                verify_file_integrity(checkpoint_files, qc)
        _ignore_known_keys(model, qc)
        logger.info("wush: %d Linears replaced by WushLinear before loading", n)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return quantize_on_load(model, self._on_load_config)
        _set_row_exponents(model, getattr(self, "_index", {}))
        _check_loaded(model)
        verify_checksums(model, getattr(self, "_index", {}), self.quantization_config)
        return model

    def get_state_dict_and_metadata(self, model):
        """The model's state dict with no storage shared between two WushLinear buffers (safetensors would drop
        all but one name, e.g. of a transform shared by q/k/v), the guard tensors and the integrity tensor. The
        quantization config is rebuilt from the model first (current layers, current format version: a loaded
        format-1 checkpoint is re-saved as format 2); save_pretrained writes config.json after this hook."""
        attach(model)
        for mod in quantized_modules(model).values():  # scales set without refresh_row_exponent (by hand) included
            mod.refresh_row_exponent()
        state = model.state_dict()
        seen: dict[Any, str] = {}
        for key, t in state.items():
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = (t.untyped_storage().data_ptr(), t.device)
            if ptr in seen and _is_wush_buffer(model, key):
                state[key] = t.clone()
            else:
                seen.setdefault(ptr, key)
        for name in quantized_modules(model):
            state[f"{name}.{_GUARD}"] = torch.empty(0, dtype=torch.uint8)
        state[INTEGRITY_TENSOR] = integrity_tensor(_written(model, state), self.quantization_config)
        return state, {}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _written(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` save_pretrained writes: tied weights (written once, under the other name) dropped."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    tied -= {f"{name}.{_GUARD}" for name in quantized_modules(model)}  # a quantized lm_head is untied on save
    return {k: v for k, v in state.items() if k not in tied}


def _ignore_known_keys(model: nn.Module, qconfig: WushQuantizationConfig) -> None:
    """Tell transformers' load report that the guard tensors are expected extras (and, in format 1, that the row
    exponents are derived, not missing). Instance attributes: the model class is left alone."""
    names = "|".join(re.escape(n) for n in qconfig.modules)
    if not names:
        return
    unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    unexpected.add(rf"(^|\.)({names})\.{_GUARD}$")
    unexpected.add(rf"^{INTEGRITY_TENSOR}$")
    model._keys_to_ignore_on_load_unexpected = unexpected
    if qconfig.format_version < 2:
        missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
        missing.add(rf"(^|\.)({names})\.weight_row_exponent$")
        model._keys_to_ignore_on_load_missing = missing


def _set_row_exponents(model: nn.Module, index: dict) -> None:
    """Derive the MXFP4 row exponents a checkpoint lacks (format 1); check the stored ones against the scales."""
    for name, mod in quantized_modules(model).items():
        if mod.weight_row_exponent is None or mod.weight_scales.device.type == "meta":
            continue
        want = formats.mx_row_reference_exponent(mod.weight_scales)
        have = mod.weight_row_exponent
        stored = any(k == f"{name}.weight_row_exponent" or k.endswith(f".{name}.weight_row_exponent") for k in index)
        if not stored or have.device.type == "meta":
            mod.weight_row_exponent = want
        elif not torch.equal(have.to(want.device), want):
            path = index.get(f"{name}.weight_row_exponent", ("the checkpoint",))[0]
            raise CheckpointError(
                f"{path}: tensor '{name}.weight_row_exponent' does not match the row maxima of "
                f"'{name}.weight_scales'; the file is corrupt or was edited - save it again"
            )


def on_load_config(qconfig: WushQuantizationConfig) -> WushConfig:
    """The :class:`WushConfig` a user's ``WushQuantizationConfig(method=..., transform=..., format=...)`` asks to
    quantize on load with; a ValueError naming ``wush_compile.quantize`` for a data-aware one."""
    from calibrate.onload import check_data_free

    if qconfig.modules:
        raise ValueError(
            "quantization_config lists quantized modules, but the checkpoint is not a wush checkpoint; pass "
            "WushQuantizationConfig(method='rtn', transform=...) to quantize on load"
        )
    base = qconfig.wush_config() or WushConfig()
    fields = {"format": qconfig.format, "method": qconfig.method, "transform": qconfig.transform}
    return check_data_free(base.replace(**{k: v for k, v in fields.items() if v is not None}))


def quantize_on_load(model: nn.Module, config: WushConfig) -> nn.Module:
    """Data-free RTN of a freshly loaded full-precision model (``calibrate.onload``); marks it a wush model."""
    from calibrate.onload import quantize_loaded

    quantize_loaded(model, config)
    attach(model, config)
    model.hf_quantizer.pre_quantized = True  # what it holds now is quantized (save_pretrained / reload)
    return model


def _is_wush_buffer(model: nn.Module, key: str) -> bool:
    module_name = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(module_name), WushLinear)
    except AttributeError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------------------------


def wush_config(model: nn.Module) -> WushConfig | None:
    """The calibration config recorded for ``model`` (None when unknown)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    return qc.wush_config() if isinstance(qc, WushQuantizationConfig) else None


def attach(model: PreTrainedModel, config: WushConfig | None = None) -> WushQuantizationConfig:
    """Mark ``model`` (with WushLinear layers) as a wush model so ``save_pretrained`` writes a loadable checkpoint.

    Sets ``model.config.quantization_config`` (describing the current layers; ``config`` records the calibration
    settings, else the ones recorded before are kept) and ``model.hf_quantizer``. Called by ``save_pretrained``
    itself once wush_compile is imported; calibration may call it to record its config.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"attach expects a transformers PreTrainedModel, got {type(model).__name__}")
    if config is None:
        config = wush_config(model)
    qconfig = WushQuantizationConfig.from_model(model, config)
    if not qconfig.modules:
        raise ValueError(f"{type(model).__name__} has no WushLinear layer; calibrate it first")
    _untie_quantized_outputs(model, qconfig.modules)
    model.config.quantization_config = qconfig
    if not isinstance(getattr(model, "hf_quantizer", None), WushHfQuantizer):
        # Replaces e.g. the GGUF loader's quantizer of the demo model: the weights are now ours.
        model.hf_quantizer = WushHfQuantizer(qconfig, pre_quantized=True)
    else:
        model.hf_quantizer.quantization_config = qconfig
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return qconfig


def save_pretrained(
    model: PreTrainedModel, save_directory, config: WushConfig | None = None, *, dtype: torch.dtype | None = None, **kwargs
):
    """Save a model holding WushLinear layers as a wush checkpoint: :func:`attach` (records the layers and the
    calibration ``config``), optionally ``model.to(dtype)`` first (transforms, biases and the high-precision weights
    follow; codes, scales and global scales stay exact), then ``model.save_pretrained(save_directory, **kwargs)``.

    ``calibrate()`` attaches the quantizer itself, so a calibrated model may call ``model.save_pretrained`` directly;
    a model assembled by hand (``quantize_linear``) needs this function or :func:`attach` first.
    """
    if dtype is not None:
        model.to(dtype)
    attach(model, config)
    return model.save_pretrained(save_directory, **kwargs)


def register() -> None:
    """Register quant_method "wush" with transformers; safe to call repeatedly. ``save_pretrained`` itself is not
    touched: the save path runs through the quantizer that :func:`attach` (or loading) puts on the model."""
    for mapping, cls, reg in (
        (_hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, WushQuantizationConfig, _hf_auto.register_quantization_config),
        (_hf_auto.AUTO_QUANTIZER_MAPPING, WushHfQuantizer, _hf_auto.register_quantizer),
    ):
        if mapping.get(QUANT_METHOD) is cls:
            continue
        mapping.pop(QUANT_METHOD, None)  # an earlier copy of this module (importlib.reload)
        reg(QUANT_METHOD)(cls)
    current = PreTrainedModel.save_pretrained
    original = getattr(current, "__wush_original__", None)
    if original is not None:  # an earlier version of this module wrapped it: undo
        PreTrainedModel.save_pretrained = original


register()
