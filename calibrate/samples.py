"""Calibration samples from what a user has: texts, a text file, a ``datasets.Dataset``, or token ids.

:func:`build_batches` turns any of them into the batches :func:`calibrate.calibrate` takes: (B, L) token-id
tensors, or, for ragged samples, mappings ``{"input_ids": (B, L), "attention_mask": (B, L)}`` padded on the
right (padded tokens enter no Hessian).

- a list of strings: one sample per text, truncated to ``seqlen`` tokens;
- a text file path (``str`` / ``os.PathLike``): its tokens cut into ``nsamples`` windows of ``seqlen`` (the
  ``wush quantize`` sampling, :func:`calibrate.data.calibration_batches`);
- a dataset (``datasets.Dataset`` or anything with ``column_names`` and row access): its ``text_column``, or
  its ``messages`` column rendered with the tokenizer's chat template;
- token ids: a (N, L) tensor, a mapping with ``input_ids`` (and ``attention_mask``), or a list of tensors /
  such mappings (used as they are).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from . import data

logger = logging.getLogger(__name__)

__all__ = ["build_batches", "texts_from_dataset", "pad_samples"]


def pad_samples(samples: list[torch.Tensor], batch_size: int, pad_id: int = 0) -> list[Any]:
    """Ragged 1-D token-id samples -> batches of ``batch_size``: plain (B, L) tensors where all samples of a
    batch have one length, else ``{"input_ids", "attention_mask"}`` padded on the right with ``pad_id``."""
    out: list[Any] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        lengths = [int(s.numel()) for s in chunk]
        width = max(lengths)
        if min(lengths) == width:
            out.append(torch.stack(chunk))
            continue
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, L)
        for row, s in enumerate(chunk):
            ids[row, : s.numel()] = s
            mask[row, : s.numel()] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def texts_from_dataset(dataset: Any, tokenizer, *, text_column: str = "text") -> list[str]:
    """The rows of a dataset as texts: ``text_column``, or ``messages`` through the tokenizer's chat template."""
    columns = list(dataset.column_names)
    if text_column in columns:
        texts = [row[text_column] for row in _rows(dataset)]
    elif "messages" in columns:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "quantize: the dataset has a 'messages' column, but the tokenizer has no chat template; pass a "
                "tokenizer with one (tokenizer.chat_template) or a dataset with a text column (text_column=...)"
            )
        texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in _rows(dataset)]
    else:
        raise ValueError(
            f"quantize: the dataset has no {text_column!r} or 'messages' column (columns: {columns}); pass "
            "text_column='NAME' naming its text column"
        )
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"quantize: dataset rows {bad[:5]} of column {text_column!r} are not strings")
    return texts


def _rows(dataset: Any):
    for i in range(len(dataset)):
        yield dataset[i]


def _tokenize_texts(texts: list[str], tokenizer, seqlen: int, nsamples: int) -> list[torch.Tensor]:
    if tokenizer is None:
        raise ValueError("quantize: texts need a tokenizer; pass tokenizer=... (the model's own)")
    samples = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"quantize: dataset items must all be strings, got a {type(text).__name__}")
        ids = data.tokenize(tokenizer, text)[:seqlen]
        if ids.numel():
            samples.append(ids)
        if len(samples) == nsamples:
            break
    if not samples:
        raise ValueError("quantize: the texts hold no tokens; pass non-empty calibration texts")
    if len(samples) < nsamples:
        logger.info("quantize: %d calibration samples (nsamples=%d asked for more than the texts hold)",
                    len(samples), nsamples)
    return samples


def build_batches(
    dataset: Any,
    tokenizer=None,
    *,
    nsamples: int,
    seqlen: int,
    batch_size: int = 8,
    seed: int = 0,
    text_column: str = "text",
) -> list[Any]:
    """Calibration batches for :func:`calibrate.calibrate` from ``dataset`` (see the module docstring)."""
    if isinstance(dataset, (str, os.PathLike)):
        ids = data.tokenize(_need(tokenizer, "a text file"), data.read_text(dataset))
        return data.calibration_batches(ids, nsamples, seqlen, seed=seed, batch_size=batch_size)
    if isinstance(dataset, torch.Tensor):
        if dataset.is_floating_point():
            raise TypeError("quantize: a tensor dataset must hold integer token ids, got a floating-point tensor")
        ids = dataset.unsqueeze(0) if dataset.dim() == 1 else dataset
        return list(ids.long().split(batch_size))
    if hasattr(dataset, "keys") and "input_ids" in dataset:
        ids = torch.as_tensor(dataset["input_ids"])
        mask = dataset.get("attention_mask")
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if mask is None:
            return list(ids.long().split(batch_size))
        mask = torch.as_tensor(mask).reshape(ids.shape)
        return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.long().split(batch_size), mask.split(batch_size))]
    if _is_dataset(dataset):
        texts = texts_from_dataset(dataset, tokenizer, text_column=text_column)
        return pad_samples(_tokenize_texts(texts, tokenizer, seqlen, nsamples), batch_size, _pad_id(tokenizer))
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise ValueError("quantize: the dataset is empty; pass calibration texts or token ids")
        if all(isinstance(t, str) for t in dataset):
            samples = _tokenize_texts(list(dataset), tokenizer, seqlen, nsamples)
            return pad_samples(samples, batch_size, _pad_id(tokenizer))
        if all(isinstance(t, torch.Tensor) or (hasattr(t, "keys") and "input_ids" in t) for t in dataset):
            return list(dataset)
        raise TypeError(
            "quantize: a list dataset must hold only strings (texts) or only token-id tensors / mappings with "
            f"'input_ids', got {sorted({type(t).__name__ for t in dataset})}"
        )
    raise TypeError(
        f"quantize: cannot build calibration samples from a {type(dataset).__name__}; pass a list of texts, a text "
        "file path, a datasets.Dataset, or token ids (a tensor or {'input_ids', 'attention_mask'})"
    )


def _need(tokenizer, what: str):
    if tokenizer is None:
        raise ValueError(f"quantize: {what} needs a tokenizer; pass tokenizer=... (the model's own)")
    return tokenizer


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)
