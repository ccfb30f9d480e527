"""Calibration and evaluation text, and its tokenization.

The default text is installed with every CPython: the documentation topics of ``pydoc_data.topics``. Topics
are sorted by name and split deterministically into two DISJOINT parts: every ``EVAL_EVERY``-th topic is
evaluation text, the rest calibration text. User text files replace either part.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_EVERY",
    "default_texts",
    "read_text",
    "tokenize",
    "calibration_batches",
    "evaluation_tokens",
]

#: Every EVAL_EVERY-th pydoc topic (sorted by name) is held out for evaluation.
EVAL_EVERY = 4
_SEPARATOR = "\n\n"


def default_texts() -> tuple[str, str]:
    """``(calibration_text, evaluation_text)`` from CPython's ``pydoc_data.topics``, disjoint by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Python builds
        raise RuntimeError(
            "the default calibration text comes from CPython's pydoc_data package, which this Python lacks; "
            "pass text files with --calib-text and --eval-text"
        ) from exc
    names = sorted(topics)
    calib = [topics[n] for i, n in enumerate(names) if i % EVAL_EVERY != EVAL_EVERY - 1]
    evals = [topics[n] for i, n in enumerate(names) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return _SEPARATOR.join(calib), _SEPARATOR.join(evals)


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A text file's contents (UTF-8 unless ``encoding`` says otherwise); clear errors for a missing, empty,
    binary or wrongly encoded file (never silently replaced characters)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist; pass a path to a UTF-8 text file")
    with open(path, "rb") as f:
        raw = f.read()
    nul = raw.find(b"\x00", 0, 1 << 20)
    if nul >= 0:
        raise ValueError(f"text file {path!r} looks binary (it holds NUL bytes at offset {nul}); pass a plain text file")
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"text file {path!r} is not valid {encoding} (byte {raw[exc.start]:#04x} at offset {exc.start}); convert it "
            f"to UTF-8 or pass its encoding (--encoding latin-1)"
        ) from None
    if not text.strip():
        raise ValueError(f"text file {path!r} is empty; it must hold the text to calibrate or evaluate on")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids  # (1, T)
    return ids[0].to(torch.int64)


def calibration_batches(
    token_ids: torch.Tensor, nsamples: int, seqlen: int, *, seed: int = 0, batch_size: int = 8
) -> list[torch.Tensor]:
    """``nsamples`` non-overlapping windows of ``seqlen`` tokens, chosen with ``seed``, in (B, seqlen) batches.

    Raises a ValueError with the numbers when the text holds fewer than ``nsamples * seqlen`` tokens.
    """
    for name, v in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"calibration_batches: {name} must be a positive integer, got {v!r}")
    ids = token_ids.reshape(-1)
    available = ids.numel() // seqlen
    if available < nsamples:
        raise ValueError(
            f"calibration text is too short: {ids.numel()} tokens hold {available} windows of seqlen={seqlen}, "
            f"but nsamples={nsamples} need {nsamples * seqlen} tokens; lower --nsamples / --seqlen or pass a longer "
            "--calib-text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=gen)[:nsamples].sort().values * seqlen  # (nsamples,)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])  # (nsamples, seqlen)
    return list(windows.split(batch_size))


def evaluation_tokens(token_ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """The first whole ``seqlen`` chunks of the evaluation text (at most ``max_tokens`` tokens): 1-D int64."""
    ids = token_ids.reshape(-1)
    if seqlen < 2:
        raise ValueError(f"evaluation seqlen must be >= 2 (one predicted token per chunk needs 2), got {seqlen}")
    n = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    chunks = n // seqlen
    if chunks == 0:
        raise ValueError(
            f"evaluation text is too short: {ids.numel()} tokens (budget {n}) do not fill one chunk of "
            f"seqlen={seqlen}; lower --seqlen or pass a longer --eval-text"
        )
    return ids[: chunks * seqlen].clone()
