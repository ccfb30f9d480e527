"""Resumable calibration: ``calibrate(..., checkpoint_dir=DIR)`` / ``wush quantize --resume DIR``.

After each finished decoder block ``i`` the directory receives, each file written to a temporary name and
moved into place with ``os.replace`` (a kill never leaves a half-written file under a real name):

    block-00003.pt            the block's WushLinears (path, constructor settings, state dict) and its report
                              records (layer errors, Linears left in high precision)
    hidden-00003.pt           the next block's input hidden states (``BlockInputs.hidden``), one per batch
    manifest.json             the fingerprint of the run and the last finished block: the commit point

The manifest is replaced last, so whatever was killed, it names a block whose files are complete; the hidden
states of the previous block are removed only after it is committed. On a start with an existing manifest, the
fingerprint (WushConfig, model config, sampled model weights, calibration token ids and masks, number of
blocks, model dtype, compute device type, wush_compile and torch versions) must match, else the run is refused
with an error naming what differs. The finished blocks are rebuilt and swapped in (through the same swap list
as freshly calibrated ones, so an error later still restores the full-precision model), the saved hidden
states replace the captured ones, and calibration continues with the next block. Everything a block's
calibration reads is either in the checkpoint or recomputed identically (the blocks' keyword arguments come
from the embedding pass on the unchanged model; seeds depend on the config and the layer name only), so the
result is bit-identical to an uninterrupted run.

When the run completes, the last hidden states are removed and the manifest is marked complete; the block
files stay (about the size of the quantized model), so calling again with the same directory rebuilds the
calibrated model without recomputing it (e.g. after a failed save). Delete the directory once the checkpoint
is saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

import torch
from torch import nn

from wush_compile.modules import WushLinear

logger = logging.getLogger(__name__)

__all__ = ["CalibrationCheckpoint", "CheckpointMismatchError", "fingerprint"]

LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
_WEIGHT_SAMPLES = 4096  # elements hashed per parameter (evenly spaced)


class CheckpointMismatchError(ValueError):
    """The checkpoint directory belongs to another calibration run."""


def _hash_tensors(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sampled_weights_hash(model: nn.Module) -> str:
    """A digest of every parameter's name, shape, dtype and up to 4096 evenly spaced values (cheap for a large
    model; another checkpoint of the same architecture differs in nearly every element)."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        h.update(f"{name}{p.dtype}{tuple(p.shape)}".encode())
        if p.device.type == "meta":
            h.update(b"meta")
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _WEIGHT_SAMPLES)
        sample = flat[::step][:_WEIGHT_SAMPLES].contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    d = cfg.to_dict()
    for k in ("_name_or_path", "transformers_version", "quantization_config"):  # where it lives, not what it is
        d.pop(k, None)
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def fingerprint(model, config, batches, masks, num_blocks: int, dtype: torch.dtype, device) -> dict:
    """What must be equal for a saved block to be reused (see the module docstring)."""
    import wush_compile

    fp = {
        "config": config.to_dict(),
        "model_config": _model_config(model),
        "model_weights": _sampled_weights_hash(model),
        "calibration_tokens": _hash_tensors(batches),
        "attention_masks": _hash_tensors(masks),
        "num_blocks": int(num_blocks),
        "dtype": str(dtype),
        "device": torch.device(device).type,
        "wush_compile": wush_compile.__version__,
        "torch": torch.__version__,
    }
    return json.loads(json.dumps(fp, sort_keys=True))  # as it reads back from the manifest


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<missing>"), now.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out


def _atomic_write(path: str, write) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_synced(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the manifest names it


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CalibrationCheckpoint:
    """The checkpoint directory of one calibration run (see the module docstring)."""

    def __init__(self, directory: str, fp: dict) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint_dir {directory!r} is a file; pass a directory (new or of an earlier run)")
        os.makedirs(self.directory, exist_ok=True)
        self.fingerprint = fp
        self.last_done = -1  # the last finished block
        self.complete = False
        manifest = self._read_manifest()
        if manifest is not None:
            self._check(manifest)
            self.last_done = int(manifest["last_finished_block"])
            self.complete = bool(manifest.get("complete", False))
        for name in os.listdir(self.directory):  # temporary files of a killed write
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(self.directory, name))

    # ---- reading ------------------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _read_manifest(self) -> dict | None:
        path = self._path(MANIFEST)
        if not os.path.exists(path):
            if any(n.startswith("block-") for n in os.listdir(self.directory)):
                raise CheckpointMismatchError(
                    f"checkpoint_dir {self.directory!r} holds block files but no {MANIFEST}; it is not a "
                    "calibration checkpoint of ours (delete it or pass another directory)"
                )
            return None
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointMismatchError(f"checkpoint_dir {self.directory!r}: cannot read {MANIFEST}: {exc}") from exc
        if manifest.get("layout") != LAYOUT_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint_dir {self.directory!r} has checkpoint layout {manifest.get('layout')!r}, this version "
                f"writes {LAYOUT_VERSION}; delete the directory to calibrate from the start"
            )
        return manifest

    def _check(self, manifest: dict) -> None:
        diffs = _differences(manifest.get("fingerprint", {}), self.fingerprint)
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint_dir {self.directory!r} was written by another calibration run, so its blocks cannot "
                "be reused: " + "; ".join(diffs) + ". Resume with the same model, data and settings, or pass a new "
                "(or emptied) directory"
            )

    @property
    def start_block(self) -> int:
        return self.last_done + 1

    def restore(self, layers: nn.ModuleList, arch, report, inputs, swapped: list, home) -> int:
        """Swap the saved WushLinears of the finished blocks in (appending to ``swapped``), restore their report
        records and the next block's hidden states; returns the block to continue with."""
        from .pipeline import LayerRecord, _set_submodule

        if self.last_done < 0:
            return 0
        for j in range(self.last_done + 1):
            path = self._path(f"block-{j:05d}.pt")
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError) as exc:
                raise CheckpointMismatchError(f"checkpoint {path!r} cannot be read ({exc}); delete the directory "
                                              "to calibrate from the start") from exc
            block = layers[j]
            for m in saved["modules"]:
                original = block.get_submodule(m["path"])
                kw = m["init"]
                if not isinstance(original, nn.Linear) or (original.in_features, original.out_features) != (
                    kw["in_features"], kw["out_features"]
                ):
                    raise CheckpointMismatchError(
                        f"checkpoint {path!r}: {arch.layers_path}.{j}.{m['path']} is not a Linear "
                        f"({kw['in_features']} -> {kw['out_features']}) in this model"
                    )
                wl = WushLinear(**{**kw, "dtype": getattr(torch, kw["dtype"])}, device=home)
                wl.load_state_dict(m["state"])
                _set_submodule(block, m["path"], wl)
                swapped.append((block, m["path"], original))
            report.layers.extend(LayerRecord(**r) for r in saved["layers"])
            report.skipped.extend(tuple(s) for s in saved["skipped"])
        if not self.complete:
            path = self._path(f"hidden-{self.last_done:05d}.pt")
            hidden = torch.load(path, map_location=inputs.storage, weights_only=True)
            if len(hidden) != len(inputs.hidden) or any(a.shape != b.shape for a, b in zip(hidden, inputs.hidden)):
                raise CheckpointMismatchError(f"checkpoint {path!r} does not match the calibration batches")
            inputs.hidden = hidden
        logger.info("resumed calibration from %s: blocks 0..%d restored%s", self.directory, self.last_done,
                    " (complete)" if self.complete else f", continuing at block {self.last_done + 1}")
        return self.last_done + 1

    # ---- writing ------------------------------------------------------------------------------------------

    def save_block(self, i: int, block_swaps: list, layer_records: list, skipped: list, hidden, last: bool) -> None:
        """Commit finished block ``i``: its WushLinears, report records, the next block's hidden states (not
        after the ``last`` block), then the manifest."""
        modules = []
        for block, path, _original in block_swaps:
            wl = block.get_submodule(path)
            modules.append({
                "path": path,
                "init": {
                    "in_features": wl.in_features,
                    "out_features": wl.out_features,
                    "bias": wl.bias is not None,
                    "fmt": wl.fmt.value,
                    "dtype": _dtype_name(wl.dtype),
                    "transform_kind": wl.transform_kind.value,
                    "share_group": wl.share_group,
                    **({"dynamic_act_scale": True} if wl.dynamic_act_scale else {}),
                },
                "state": {k: v.detach().cpu() for k, v in wl.state_dict().items()},
            })
        payload = {
            "index": i,
            "modules": modules,
            "layers": [dataclasses.asdict(r) for r in layer_records],
            "skipped": [list(s) for s in skipped],
        }
        _atomic_write(self._path(f"block-{i:05d}.pt"), lambda p: _save_synced(payload, p))
        if not last:
            cpu_hidden = [h.detach().cpu() for h in hidden]
            _atomic_write(self._path(f"hidden-{i:05d}.pt"), lambda p: _save_synced(cpu_hidden, p))
        manifest = {
            "layout": LAYOUT_VERSION,
            "fingerprint": self.fingerprint,
            "last_finished_block": i,
            "complete": last,
        }

        def write_manifest(p: str) -> None:
            with open(p, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())

        _atomic_write(self._path(MANIFEST), write_manifest)
        self.last_done, self.complete = i, last
        for name in os.listdir(self.directory):  # hidden states no longer needed
            if name.startswith("hidden-") and name != f"hidden-{i:05d}.pt":
                os.remove(self._path(name))
